"""Precedence and validation of settings: CLI > environment > ini > default."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pytest_llmmerge.option_specs import OPTIONS, OptionSpec
from pytest_llmmerge.settings import Settings, SettingsError, resolve_settings


def make_dirs(tmp_path: Path, *names: str) -> None:
    for name in names:
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")


def resolve(tmp_path: Path, cli: dict[str, object] | None = None, env: dict[str, str] | None = None,
            ini: dict[str, object] | None = None) -> Settings:
    return resolve_settings(cli=cli or {}, env=env or {}, ini=lambda key: (ini or {}).get(key),
                            invocation_dir=tmp_path / "cwd", ini_dir=tmp_path)


def test_defaults_leave_the_plugin_off(tmp_path: Path) -> None:
    settings = resolve(tmp_path)
    assert settings == Settings()
    assert not settings.enabled


def test_cli_beats_env_beats_ini(tmp_path: Path) -> None:
    make_dirs(tmp_path, "cwd/cli", "cwd/env", "ini")
    ini = {"llm_model": "ini"}
    assert resolve(tmp_path, ini=ini).model == tmp_path / "ini"
    assert resolve(tmp_path, env={"LLMMERGE_MODEL": "env"}, ini=ini).model == tmp_path / "cwd/env"
    assert resolve(tmp_path, cli={"model": "cli"}, env={"LLMMERGE_MODEL": "env"}, ini=ini).model == \
        tmp_path / "cwd/cli"


def test_ini_paths_are_relative_to_the_ini_file(tmp_path: Path) -> None:
    make_dirs(tmp_path, "m", "b", "a1", "a2")
    settings = resolve(tmp_path, ini={"llm_model": "m", "llm_base": "b", "llm_adapters": ["a1", "a2"]})
    assert settings.adapters == (tmp_path / "a1", tmp_path / "a2")
    assert settings.base == tmp_path / "b"


def test_adapters_from_env_keep_merge_order(tmp_path: Path) -> None:
    make_dirs(tmp_path, "cwd/m", "cwd/b", "cwd/z", "cwd/a")
    settings = resolve(tmp_path, cli={"model": "m", "base": "b"}, env={"LLMMERGE_ADAPTERS": os.pathsep.join(["z", "a"])})
    assert [p.name for p in settings.adapters] == ["z", "a"]


@pytest.mark.parametrize("raw,expected", [("1", True), ("yes", True), ("FALSE", False), ("off", False)])
def test_bool_env_values(tmp_path: Path, raw: str, expected: bool) -> None:
    assert resolve(tmp_path, env={"LLMMERGE_ALLOW_PICKLE": raw}).allow_pickle is expected


def test_bool_precedence(tmp_path: Path) -> None:
    assert resolve(tmp_path, ini={"llm_trust_remote_code": True}).trust_remote_code
    assert not resolve(tmp_path, env={"LLMMERGE_TRUST_REMOTE_CODE": "0"},
                       ini={"llm_trust_remote_code": True}).trust_remote_code
    assert resolve(tmp_path, cli={"trust_remote_code": True},
                   env={"LLMMERGE_TRUST_REMOTE_CODE": "0"}).trust_remote_code


def test_bad_bool_names_its_source(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="environment variable LLMMERGE_ALLOW_PICKLE: 'maybe'"):
        resolve(tmp_path, env={"LLMMERGE_ALLOW_PICKLE": "maybe"})
    with pytest.raises(SettingsError, match="ini option llm_allow_pickle: 'perhaps'"):
        resolve(tmp_path, ini={"llm_allow_pickle": "perhaps"})


def test_missing_and_empty_directories_are_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"--llm-model: .*nowhere does not exist"):
        resolve(tmp_path, cli={"model": "nowhere"})
    (tmp_path / "cwd" / "empty").mkdir(parents=True)
    with pytest.raises(SettingsError, match=r"--llm-model: .*empty is empty"):
        resolve(tmp_path, cli={"model": "empty"})
    (tmp_path / "cwd" / "file.txt").write_text("x")
    with pytest.raises(SettingsError, match="not a directory"):
        resolve(tmp_path, cli={"model": "file.txt"})


def test_adapters_need_a_base(tmp_path: Path) -> None:
    make_dirs(tmp_path, "cwd/m", "cwd/a")
    with pytest.raises(SettingsError, match="--llm-adapter needs --llm-base"):
        resolve(tmp_path, cli={"model": "m", "adapters": ["a"]})


def test_every_option_has_three_distinct_spellings() -> None:
    for spec in OPTIONS:
        assert spec.flag.startswith("--llm-") and spec.ini.startswith("llm_") and spec.env.startswith("LLMMERGE_")
    assert len({s.env for s in OPTIONS}) == len({s.ini for s in OPTIONS}) == len(OPTIONS)


NUMERIC = [s for s in OPTIONS if s.kind in ("int", "float")]


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "-1", "0"])
@pytest.mark.parametrize("spec", NUMERIC, ids=[s.flag for s in NUMERIC])
def test_non_finite_or_negative_thresholds_are_usage_errors(tmp_path: Path, spec: object, raw: str) -> None:
    """A threshold of nan compares false with everything and would switch its check off silently."""
    assert isinstance(spec, OptionSpec)
    if spec.kind == "int" and raw in ("nan", "inf", "-inf"):
        match = "is not an integer"
    else:
        match = "must be a finite number greater than 0"
    with pytest.raises(SettingsError, match=f"{spec.flag}: '{raw}' {match}"):
        resolve(tmp_path, cli={spec.dest: raw})
    with pytest.raises(SettingsError, match=f"environment variable {spec.env}: '{raw}'"):
        resolve(tmp_path, env={spec.env: raw})


@pytest.mark.parametrize("spec", NUMERIC, ids=[s.flag for s in NUMERIC])
def test_numbers_past_what_a_type_holds_are_usage_errors(tmp_path: Path, spec: object) -> None:
    """10**400 is an int no float holds: a usage error, not an OverflowError."""
    assert isinstance(spec, OptionSpec)
    with pytest.raises(SettingsError, match=f"{spec.flag}: '10000"):
        resolve(tmp_path, cli={spec.dest: str(10**400)})


BOUNDED = [s for s in NUMERIC if s.maximum is not None]


@pytest.mark.parametrize("spec", BOUNDED, ids=[s.flag for s in BOUNDED])
def test_sizes_and_deadlines_past_their_maximum_are_usage_errors(tmp_path: Path, spec: object) -> None:
    """A timeout of 1e46 s would be accepted and then overflow the first wait that uses it."""
    assert isinstance(spec, OptionSpec) and spec.maximum is not None
    at_most = str(int(spec.maximum))
    assert getattr(resolve(tmp_path, cli={spec.dest: at_most}), spec.dest) == float(at_most)
    with pytest.raises(SettingsError, match=f"{spec.env}: '1e46' .* the most this option takes, {at_most}$"
                       if spec.kind == "float" else f"{spec.env}: '1e46' is not an integer"):
        resolve(tmp_path, env={spec.env: "1e46"})
    with pytest.raises(SettingsError, match=f"the most this option takes, {at_most}$"):
        resolve(tmp_path, cli={spec.dest: str(int(spec.maximum) + 1)})


def test_errors_name_the_environment_variable_the_value_came_from(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="environment variable LLMMERGE_MODEL: .*nowhere does not exist"):
        resolve(tmp_path, env={"LLMMERGE_MODEL": str(tmp_path / "nowhere")})
    with pytest.raises(SettingsError, match="ini option llm_base: .*nowhere does not exist"):
        make_dirs(tmp_path, "m")
        resolve(tmp_path, cli={"model": str(tmp_path / "m")}, ini={"llm_base": "nowhere"})


def test_build_merged_onto_a_file_is_a_usage_error(tmp_path: Path) -> None:
    make_dirs(tmp_path, "base", "lora")
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(SettingsError, match="--llm-model: .*out is a file; with --llm-build-merged"):
        resolve(tmp_path, cli={"model": str(tmp_path / "out"), "build_merged": True, "base": str(tmp_path / "base"),
                               "adapters": [str(tmp_path / "lora")]})


@pytest.mark.parametrize("dest,flag", [("report", "--llm-report"), ("report_md", "--llm-report-md")])
def test_reports_are_refused_inside_checkpoints(tmp_path: Path, dest: str, flag: str) -> None:
    """A report named config.json inside the model directory would replace the checkpoint's own."""
    make_dirs(tmp_path, "m", "b")
    for target in ("m/config.json", "b/sub/report.json"):
        with pytest.raises(SettingsError, match=f"{flag}: .* lies inside the checkpoint directory"):
            resolve(tmp_path, cli={"model": str(tmp_path / "m"), "base": str(tmp_path / "b"),
                                   dest: str(tmp_path / target)})
    with pytest.raises(SettingsError, match=f"{flag}: .* is a directory"):
        resolve(tmp_path, cli={"model": str(tmp_path / "m"), dest: str(tmp_path)})
    assert getattr(resolve(tmp_path, cli={"model": str(tmp_path / "m"), dest: str(tmp_path / "r.out")}), dest)


def test_an_unreadable_directory_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root reads everything, so the permission error is simulated where the directory is listed."""
    make_dirs(tmp_path, "m")
    real_iterdir = Path.iterdir

    def iterdir(self: Path) -> Any:
        if self.name == "m":
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(SettingsError, match=r"environment variable LLMMERGE_MODEL: .*m cannot be read: Permission"):
        resolve(tmp_path, env={"LLMMERGE_MODEL": str(tmp_path / "m")})


@pytest.mark.parametrize("name", ["loop", "~no-such-user-here/x", "a" * 300, "nul\0byte"])
def test_a_path_no_file_system_takes_is_a_usage_error(tmp_path: Path, name: str) -> None:
    """A symlink loop, an unknown ~user, a name too long, a NUL byte: usage errors, not INTERNALERROR."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "loop").symlink_to(tmp_path / "cwd" / "loop")
    with pytest.raises(SettingsError, match="^environment variable LLMMERGE_MODEL: .* cannot be used as a path"):
        resolve(tmp_path, env={"LLMMERGE_MODEL": name})


def test_a_report_onto_a_device_or_fifo_is_refused(tmp_path: Path) -> None:
    """As root, --llm-report=/dev/null replaced the device with a JSON file."""
    make_dirs(tmp_path, "m")
    os.mkfifo(tmp_path / "fifo")
    for target in (Path(os.devnull), tmp_path / "fifo"):
        with pytest.raises(SettingsError, match="is not a regular file .* a report would replace it"):
            resolve(tmp_path, cli={"model": str(tmp_path / "m"), "report": str(target)})
