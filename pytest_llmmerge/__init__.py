"""pytest-llmmerge: gate the release of fine-tuned and LoRA-merged LLM checkpoints."""

__version__ = "0.1.0"
