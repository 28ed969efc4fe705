"""The stop set of each serving path, resolved from the files (integrity::stop_sets, GEN008),
and the deployment flags it reads.  What the real `vllm serve` does with the same files and
flags is proven in test_vllm_serve.py; here the resolution itself, both ways, without a model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import BASE, MERGED
from pytest_llmmerge.checkpoint import Checkpoint
from pytest_llmmerge.checks import checks_of
from pytest_llmmerge.checks.base import Context, Finding
from pytest_llmmerge.settings import SettingsError, resolve_settings, serve_argv
from pytest_llmmerge.stop_sets import (HF_PATH, OFFLINE_PATH, SERVED_PATH, ServeArgsError, VllmStopFlags,
                                       flags_from_engine_args, flags_from_serve_args)

IM_END, ENDOFTEXT = 2, 0
STOP_SETS = next(c for c in checks_of("integrity") if c.name == "stop_sets")


def side_files(source: Path, out: Path) -> Path:
    """The checkpoint's JSON, tokenizer and template files (stop sets read nothing else)."""
    out.mkdir(parents=True)
    for f in source.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    return out


def with_eos(path: Path, eos: object, name: str = "generation_config.json") -> Path:
    """`path` (made when missing) with eos_token_id set in its `name` file."""
    path.mkdir(parents=True, exist_ok=True)
    config = json.loads((path / name).read_text()) if (path / name).exists() else {}
    config["eos_token_id"] = eos
    (path / name).write_text(json.dumps(config))
    return path


def run(model: Path, base: Path | None = None, *, served: VllmStopFlags = VllmStopFlags(),
        offline: VllmStopFlags = VllmStopFlags()) -> tuple[list[Finding], dict[str, dict[str, object]]]:
    ctx = Context(model=Checkpoint(model), base=Checkpoint(base) if base else None, served_stop_flags=served,
                  offline_stop_flags=offline)
    findings = STOP_SETS.run(ctx)
    assert STOP_SETS.figures is not None
    (name, rows), = STOP_SETS.figures(ctx)
    assert name == "stop_sets"
    return findings, {row["path"]: row for row in rows}


def lacking(findings: list[Finding]) -> list[str]:
    return [next(p for p in (HF_PATH, OFFLINE_PATH, SERVED_PATH) if f.message.startswith(p))
            for f in findings if f.code == "GEN008"]


def test_healthy_checkpoint_stops_at_end_of_turn_on_every_path(tmp_path: Path) -> None:
    findings, rows = run(side_files(MERGED, tmp_path / "m"), BASE)
    assert findings == []
    assert rows[HF_PATH]["stop_ids"] == [ENDOFTEXT, IM_END]
    # vLLM adds the tokenizer's eos (<|endoftext|>) to generation_config.json's ids.
    assert rows[SERVED_PATH]["stop_ids"] == [ENDOFTEXT, IM_END]
    assert all(row["end_of_turn"] == "<|im_end|>" and row["stops_at_end_of_turn"] for row in rows.values())


def test_lost_end_of_turn_shows_on_every_path_and_fails_once(tmp_path: Path) -> None:
    """Without deployment flags the gap is the file's: GEN005 reports it (one broken file, one
    failing check); the table shows every path it reaches."""
    model = with_eos(side_files(MERGED, tmp_path / "m"), [ENDOFTEXT])
    findings, rows = run(model, BASE)
    assert findings == []
    assert [row["stops_at_end_of_turn"] for row in rows.values()] == [False, False, False]
    assert rows[SERVED_PATH]["stop_ids"] == [ENDOFTEXT]
    generation = next(c for c in checks_of("integrity") if c.name == "generation_config")
    assert [f.code for f in generation.run(Context(model=Checkpoint(model), base=Checkpoint(BASE)))] == ["GEN005"]


def test_override_generation_config_cannot_restore_an_eos_id(tmp_path: Path) -> None:
    """vLLM #45591: --override-generation-config changes sampling defaults; its eos_token_id
    never reaches the stop ids (the real server shows it in test_vllm_serve.py)."""
    model = with_eos(side_files(MERGED, tmp_path / "m"), [ENDOFTEXT])
    flags = flags_from_serve_args(["--override-generation-config", json.dumps({"eos_token_id": [IM_END, ENDOFTEXT]})])
    findings, rows = run(model, BASE, served=flags)
    assert SERVED_PATH in lacking(findings)
    served = next(f for f in findings if f.message.startswith(SERVED_PATH))
    assert "applies no eos id from it (vLLM #45591)" in served.message and "[2]" in served.message
    assert served.severity == "warning", "the file's own gap fails GEN005; this only says the flag cannot help"


def test_generation_config_dir_flag_restores_the_served_path_only(tmp_path: Path) -> None:
    model = with_eos(side_files(MERGED, tmp_path / "m"), [ENDOFTEXT])
    findings, rows = run(model, BASE, served=flags_from_serve_args([f"--generation-config={BASE}"]))
    assert findings == [] and rows[HF_PATH]["stops_at_end_of_turn"] is False
    assert rows[SERVED_PATH]["stops_at_end_of_turn"] is True
    assert f"of --generation-config {BASE}" in str(rows[SERVED_PATH]["source"])


def test_generation_config_dir_without_end_of_turn_breaks_a_healthy_checkpoint(tmp_path: Path) -> None:
    """The deployment points --generation-config at a pretrained base's folder (eos
    <|endoftext|> only): only the served path loses <|im_end|>, and the fix names that folder."""
    pretrain = with_eos(tmp_path / "pretrain-gen", ENDOFTEXT)
    findings, _ = run(side_files(MERGED, tmp_path / "m"), BASE, served=flags_from_serve_args(
        ["--generation-config", str(pretrain)]))
    assert lacking(findings) == [SERVED_PATH]
    assert f"add 2 to eos_token_id in {pretrain}/generation_config.json" in findings[0].message


def test_generation_config_dir_falls_back_to_its_config_json(tmp_path: Path) -> None:
    folder = with_eos(tmp_path / "only-config", IM_END, name="config.json")
    flags = flags_from_serve_args(["--generation-config", str(folder)])
    _, rows = run(side_files(MERGED, tmp_path / "m"), served=flags)
    assert rows[SERVED_PATH]["stop_ids"] == [ENDOFTEXT, IM_END]
    assert "config.json eos_token_id of --generation-config" in str(rows[SERVED_PATH]["source"])


def test_generation_config_mode_vllm_still_reads_the_models_eos_ids(tmp_path: Path) -> None:
    """vLLM 0.32: `--generation-config vllm` neutralises sampling defaults only."""
    findings, rows = run(side_files(MERGED, tmp_path / "m"), served=flags_from_serve_args(["--generation-config",
                                                                                           "vllm"]))
    assert findings == [] and rows[SERVED_PATH]["stop_ids"] == [ENDOFTEXT, IM_END]


def test_tokenizer_eos_makes_vllm_stop_where_hf_does_not(tmp_path: Path) -> None:
    """vLLM #4180 / #792 turned around: the tokenizer's eos is the end-of-turn token, the
    generation config lost it; vLLM stops there, HF generate does not."""
    model = with_eos(side_files(MERGED, tmp_path / "m"), [ENDOFTEXT])
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|im_end|>"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    findings, rows = run(model)
    assert findings == [] and rows[HF_PATH]["stops_at_end_of_turn"] is False
    assert rows[OFFLINE_PATH]["stop_ids"] == [ENDOFTEXT, IM_END]


def test_served_chat_template_decides_the_served_end_of_turn(tmp_path: Path) -> None:
    template = tmp_path / "deploy.jinja"
    # A deployment template ending turns with <|pad|>, an id no path stops at.
    template.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|pad|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    findings, rows = run(side_files(MERGED, tmp_path / "m"),
                         served=flags_from_serve_args([f"--chat-template={template}"]))
    assert lacking(findings) == [SERVED_PATH]
    assert rows[SERVED_PATH]["end_of_turn"] == "<|pad|>" and rows[HF_PATH]["end_of_turn"] == "<|im_end|>"
    assert "deploy the checkpoint's template" in findings[0].message


def test_a_flag_that_breaks_the_deployment_fails_whatever_the_base_does(tmp_path: Path) -> None:
    """The base served with the same flag would break too; the deployment is broken all the same."""
    pretrain = with_eos(tmp_path / "pretrain-gen", ENDOFTEXT)
    flags = flags_from_serve_args(["--generation-config", str(pretrain)])
    findings, _ = run(side_files(MERGED, tmp_path / "m"), BASE, served=flags)
    assert lacking(findings) == [SERVED_PATH] and findings[0].severity == "error"
    assert findings[0].file == f"{pretrain}/generation_config.json"


def test_a_flag_that_changes_nothing_adds_no_second_finding(tmp_path: Path) -> None:
    """The files lost the id (GEN005); `--generation-config vllm` serves the same ids: one
    broken file, one failing check."""
    model = with_eos(side_files(MERGED, tmp_path / "m"), [ENDOFTEXT])
    findings, rows = run(model, BASE, served=flags_from_serve_args(["--generation-config", "vllm"]),
                         offline=flags_from_engine_args({"generation_config": "vllm"}))
    assert findings == [] and rows[SERVED_PATH]["stops_at_end_of_turn"] is False


def test_hf_config_path_moves_the_generation_config_vllm_reads(tmp_path: Path) -> None:
    other = with_eos(tmp_path / "hf-config", ENDOFTEXT)
    findings, rows = run(side_files(MERGED, tmp_path / "m"), BASE,
                         served=flags_from_serve_args([f"--hf-config-path={other}"]))
    assert lacking(findings) == [SERVED_PATH]
    assert "of --hf-config-path" in str(rows[SERVED_PATH]["source"])


def test_flags_from_a_vllm_config_file_count_and_the_command_line_wins(tmp_path: Path) -> None:
    pretrain = with_eos(tmp_path / "pretrain-gen", ENDOFTEXT)
    config = tmp_path / "serve.yaml"
    config.write_text(f"generation-config: {pretrain}\nmax_model_len: 256\n")
    findings, _ = run(side_files(MERGED, tmp_path / "m"), served=flags_from_serve_args(["--config", str(config)]))
    assert lacking(findings) == [SERVED_PATH]
    flags = flags_from_serve_args(["--config", str(config), "--generation-config", "auto"])
    assert flags.generation_config == "auto"
    with pytest.raises(ServeArgsError, match="--config .* cannot be read"):
        flags_from_serve_args(["--config", str(tmp_path / "missing.yaml")])


def test_a_generation_config_folder_that_does_not_exist_is_named(tmp_path: Path) -> None:
    findings, rows = run(side_files(MERGED, tmp_path / "m"),
                         offline=flags_from_engine_args({"generation_config": str(tmp_path / "nodir")}))
    assert [f.code for f in findings] == ["GEN008"] and "vLLM refuses to start" in findings[0].message
    assert rows[OFFLINE_PATH]["unusable"]


def test_the_offline_fix_is_spelled_as_an_engine_argument(tmp_path: Path) -> None:
    pretrain = with_eos(tmp_path / "pretrain-gen", ENDOFTEXT)
    findings, _ = run(side_files(MERGED, tmp_path / "m"),
                      offline=flags_from_engine_args({"generation_config": str(pretrain)}))
    assert lacking(findings) == [OFFLINE_PATH]
    assert f"--llm-vllm-arg generation_config={pretrain}" in findings[0].message


def test_special_tokens_map_eos_wins_as_transformers_loads_it(tmp_path: Path) -> None:
    """transformers 5.19: special_tokens_map.json's eos overrides tokenizer_config.json's, and
    vLLM stops at it."""
    model = with_eos(side_files(MERGED, tmp_path / "m"), [ENDOFTEXT])
    (model / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    findings, rows = run(model, served=flags_from_serve_args(["--generation-config", "vllm"]))
    assert findings == [] and rows[SERVED_PATH]["stops_at_end_of_turn"] is True


def test_no_chat_template_means_no_end_of_turn_to_check(tmp_path: Path) -> None:
    model = with_eos(side_files(MERGED, tmp_path / "m"), [ENDOFTEXT])
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    findings, rows = run(model)
    assert findings == [] and all(row["stops_at_end_of_turn"] is None for row in rows.values())


# --- the deployment flags ---------------------------------------------------------------------


def test_serve_arg_values_split_a_flag_from_its_value_once() -> None:
    assert serve_argv(["--generation-config vllm", "--max-model-len=256", '--override-generation-config {"a": 1}',
                       "--enforce-eager"]) == ["--generation-config", "vllm", "--max-model-len=256",
                                               "--override-generation-config", '{"a": 1}', "--enforce-eager"]


def test_serve_flags_read_both_spellings_and_the_last_wins() -> None:
    flags = flags_from_serve_args(["--generation_config", "a", "--generation-config=b", "--tokenizer", "t"])
    assert flags.generation_config == "b" and flags.tokenizer == "t"
    assert flags_from_engine_args({"generation_config": "vllm"}).generation_config == "vllm"
    with pytest.raises(ServeArgsError, match="--generation-config needs a value"):
        flags_from_serve_args(["--generation-config"])


def _settings(**cli: object) -> object:
    return resolve_settings(cli=cli, env={}, ini=lambda key: None, invocation_dir=Path.cwd(), ini_dir=Path.cwd())


def test_bad_serve_args_are_usage_errors_naming_the_flag() -> None:
    with pytest.raises(SettingsError, match=r"--llm-serve-arg: --override-generation-config is not JSON"):
        _settings(serve_args=["--override-generation-config {eos: 2}"])
    with pytest.raises(SettingsError, match=r"--llm-serve-arg: --port is chosen by the plugin"):
        _settings(serve_args=["--port 8000"])
    with pytest.raises(SettingsError, match=r"LLMMERGE_SERVE_ARGS: .* not a shell-quoted command line"):
        resolve_settings(cli={}, env={"LLMMERGE_SERVE_ARGS": "--chat-template 'x"}, ini=lambda key: None,
                         invocation_dir=Path.cwd(), ini_dir=Path.cwd())


def test_serve_args_from_the_environment_are_a_shell_command_line() -> None:
    settings = resolve_settings(cli={}, env={"LLMMERGE_SERVE_ARGS": "--generation-config vllm "
                                             "--override-generation-config '{\"temperature\": 0.5}'"},
                                ini=lambda key: None, invocation_dir=Path.cwd(), ini_dir=Path.cwd())
    assert settings.serve_args == ("--generation-config", "vllm", "--override-generation-config",
                                   '{"temperature": 0.5}')


def test_a_served_tokenizer_brings_its_eos_and_its_chat_template(tmp_path: Path) -> None:
    tokenizer = side_files(MERGED, tmp_path / "other-tokenizer")
    (tokenizer / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|pad|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    flags = flags_from_serve_args(["--tokenizer", str(tokenizer)])
    findings, rows = run(side_files(MERGED, tmp_path / "m"), served=flags)
    assert rows[SERVED_PATH]["end_of_turn"] == "<|pad|>" and lacking(findings) == [SERVED_PATH]
    assert "The tokenizer deployed" in findings[0].message
