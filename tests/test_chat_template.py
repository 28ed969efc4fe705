"""End-of-turn detection and rendering on template shapes other than the fixtures' ChatML."""

from __future__ import annotations

import pytest

from pytest_llmmerge.chat_template import end_of_turn_token, render, render_samples

LLAMA3 = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
          "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
GEMMA = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{{ '<start_of_turn>' + m['role'] + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}")
LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
          "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>",
          "<s>", "</s>", "<|end|>", "<|end_of_text|>"]


@pytest.mark.parametrize("template,expected", [(LLAMA3, "<|eot_id|>"), (GEMMA, "<end_of_turn>"),
                                               (LLAMA2, "</s>"), ("{{ messages[0]['content'] }}", None)])
def test_end_of_turn_token(template: str, expected: str | None) -> None:
    assert end_of_turn_token(template, {"bos_token": "<s>", "eos_token": "</s>"}, TOKENS) == expected


def test_templates_that_raise_render_as_errors_not_crashes() -> None:
    rendered = render_samples(GEMMA, {})
    assert rendered[1].startswith("error: ") and "System role not supported" in rendered[1]
    assert rendered[0].startswith("<start_of_turn>user\nHello")


def test_generation_blocks_and_tojson_render_like_transformers() -> None:
    template = ("{% for m in messages %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}"
                "{% endfor %}{{ strftime_now('%Y') }}")
    text = render(template, [{"role": "user", "content": "功能"}], add_generation_prompt=False, special_tokens={})
    assert text == '"功能"2024'
