"""The finding codes: what each flags and the field failure it catches.

Data only.  The README's code table is generated from it (``python -m pytest_llmmerge.docs``)
and a test keeps the two equal; every code belongs to exactly one check of the registry.
"""

from __future__ import annotations

# code -> (what it means, the field failure it catches).
CODES: dict[str, tuple[str, str]] = {
    "CFG001": ("config.json missing or not valid JSON",
               "an interrupted merge writes config.json last (mergekit #54, #107)"),
    "CFG002": ("model_type differs from the base", "a config from another model copied in"),
    "CFG003": ("architectures differ from the base", "loaders pick the wrong model class"),
    "CFG004": ("config vocab_size differs from the embedding rows in the weights",
               "resized embeddings saved without updating the config (peft #1457)"),
    "CFG005": ("tokenizer has token ids beyond the embedding rows",
               "added tokens without resized embeddings: vLLM size mismatch 128320 vs 128256 (LlamaFactory #7997)"),
    "CFG006": ("warning: dtype in config.json differs from the base", "a legitimate save in another dtype, shown for review"),
    "CFG007": ("shape- or position-defining config values differ from the base, as transformers resolves them "
               "(hidden size, layers, heads, head_dim, rope parameters, tie_word_embeddings)",
               "a config that no longer describes the weights (transformers #45127)"),
    "CFG008": ("warning: a config value the model or the base leaves to the model class's default, or a "
               "context length (max_position_embeddings) that differs from the base",
               "transformers 5 writes head_dim, rope_parameters and dtype where 4.x wrote rope_theta and torch_dtype"),
    "GEN001": ("generation_config.json unreadable, or missing while config.json names no eos id either",
               "mergekit #275: merge output without generation_config.json, vLLM never stops"),
    "GEN002": ("generation_config.json empty or without eos_token_id",
               "NeMo Automodel #3890: an empty {} generation_config.json was written"),
    "GEN003": ("eos ids lack some of the base's eos ids",
               "GLM-4 #297, EasyR1 #11007: <|im_end|> dropped from eos after merge, vLLM runs to max_tokens"),
    "GEN004": ("the tokenizer's eos token is not an eos id of generation_config.json",
               "HF generate stops only at generation_config eos ids while vLLM also stops at the tokenizer's: the two disagree"),
    "GEN005": ("the chat template's end-of-turn token is not an eos id",
               "chat answers never stop (LlamaFactory #7454, unsloth #5386)"),
    "GEN006": ("warning: other generation defaults differ from the base",
               "vLLM takes default sampling parameters from generation_config.json (vLLM PR #11164)"),
    "GEN007": ("warning: no generation_config.json; transformers and vLLM take eos from config.json "
               "(its ids are then checked like the file's)",
               "older models ship none; a merge that lost it while the base has one is caught by GEN003/GEN005"),
    "GEN008": ("a serving path (HF generate, vLLM offline, vLLM served with the deployment's flags) does not stop "
               "at the chat template's end-of-turn token",
               "vLLM #45591 (--override-generation-config drops eos_token_id), #4180/#792 (stops under HF, not "
               "vLLM), Unsloth #5386 and EasyR1 #11007 (eos rewritten on save): chat answers run to max_tokens"),
    "TOK001": ("tokenizer files missing or not valid JSON", "an interrupted merge writes the tokenizer last"),
    "TOK002": ("the bos or eos token differs from the base (they change how prompts are encoded and where "
               "generation stops)", "eos rewritten after chat fine-tuning (unsloth #5386)"),
    "TOK003": ("added tokens of the base missing or with another id or content",
               "transformers v5 save dropped added_tokens_decoder (NeMo Automodel PR #2653)"),
    "TOK004": ("chat template missing while the base has one", "LlamaFactory #8399: chat template lost on save"),
    "TOK005": ("chat template renders a sample conversation differently from the base",
               "a template replaced or edited during fine-tuning"),
    "TOK006": ("chat template fails to render where the base's renders, or (without a base) cannot be "
               "read or runs past its time or size budget", "a template broken on save"),
    "TOK007": ("warning: the pad token or another special token that does not change generation differs from "
               "the base", "SFT recipes set pad = eos or add a <pad> token"),
    "TOK008": ("warning: tokens added beyond the base's vocabulary", "a pad or chat token added with resized "
               "embeddings (LlamaFactory #7997); CFG005 fails it when the embeddings were not resized"),
    "WGT001": ("no weight files", "a merge that died before writing any shard"),
    "WGT002": ("the index names a shard file that is missing", "one shard lost or never written"),
    "WGT003": ("warning: a safetensors file no loader reads (not model.safetensors, not named by the index)",
               "a leftover shard from an earlier save, or consolidated.safetensors beside the HF shards"),
    "WGT004": ("shards not loadable by name: several shards without an index, a single file not named "
               "model.safetensors, or an index not named model.safetensors.index.json",
               "mergekit writes model-N.safetensors first and renames and indexes at the end (mergekit #54, #107)"),
    "WGT005": ("safetensors header or index unreadable, or an index that maps no tensor",
               "a corrupted or partially written file"),
    "WGT006": ("a tensor's data lies past the end of its file", "a shard truncated by a killed writer or a full disk"),
    "WGT007": ("the tensors the loader reads differ by name from the base's (missing or extra)",
               "a trained lm_head dropped at merge (unsloth PR #9331), tied embeddings split"),
    "WGT008": ("tensor shapes differ from the base (other than embedding rows added for new tokens, WGT021)",
               "a wrong base, or embeddings resized without the tokens that need them"),
    "WGT009": ("warning: tensor dtypes differ from the base", "a legitimate save in another dtype, shown for review"),
    "WGT010": ("LoRA leftovers in the weights (lora_A/lora_B/base_layer/modules_to_save keys)",
               "an adapter saved instead of merged: loaders ignore the keys and the fine-tune is lost"),
    "WGT011": ("tensors the index promises are held by no shard the loaders read",
               "shards from two different saves mixed in one directory"),
    "WGT012": ("adapter_config.json inside the merged checkpoint",
               "transformers then loads the directory as an adapter on its recorded base"),
    "WGT013": ("NaN or Inf values in a tensor", "a float16 merge that overflowed, or a save that wrote garbage"),
    "WGT014": ("a tensor is constant (all zero, one value) where the base's varies; without a base, a constant matrix",
               "placeholder or meta tensors saved instead of weights (peft #868)"),
    "WGT015": ("tie_word_embeddings is true but lm_head differs from the input embedding",
               "embed_tokens and lm_head diverge after merge_and_unload while the flag stays true (transformers #45127)"),
    "WGT016": ("tie_word_embeddings is false but there is no lm_head tensor",
               "a trained or untied lm_head dropped at merge: loaders initialise it at random (unsloth PR #9331)"),
    "WGT017": ("a layer changed more than --llm-max-weight-change relative to the base (off by default)",
               "a merge with the wrong scale or the wrong adapter"),
    "WGT018": ("every tensor is bit-identical to the base although adapters were merged",
               "the \"merged\" save holds only the base weights (unsloth #1352)"),
    "WGT019": ("tensor byte ranges overlap, leave gaps, or leave bytes after the last tensor: safetensors "
               "refuses to load the file", "a shard written by a broken or interrupted writer"),
    "WGT020": ("the index and the files disagree in a way that drops weights: an index that maps no tensor, "
               "a shard of this save the index leaves out, or model.safetensors beside an index",
               "transformers initialises the tensors it does not find at random; vLLM reads the index, "
               "transformers model.safetensors"),
    "WGT021": ("warning: embedding rows added for tokens added beyond the base's vocabulary",
               "a pad or chat token added with resized embeddings; shown for review"),
    "WGT022": ("warning: shard names in the index are not the canonical <prefix>-0000i-of-0000n.safetensors",
               "loaders read the files the index names whatever they are called; shown for review"),
    "WGT023": ("warning: the index names another listed shard for a tensor than the one holding it, or "
               "does not name it", "an index rewritten by hand or by a resharding tool; loaders still read "
                                   "every tensor of every listed shard"),
    "MRG001": ("rounded: adapted weights lost more of the adapters' float32 update than their storage dtype forces, "
               "as a merge computed in a coarser float (bfloat16/float16) does, and more than --llm-audit-max-error",
               "adapter fine, merged model worse: a merge rounded through bfloat16/float16 (peft #1388, unsloth #1267)"),
    "MRG002": ("the adapters do not fit the base and candidate (targets missing, shapes or ranks differ, not LoRA, "
               "an adapter given twice), or the candidate lacks a weight they update",
               "a merge made from another base or other adapters than the ones given"),
    "MRG003": ("warning: parts of the adapters were not diagnosed (tensors that are neither LoRA factors nor whole "
               "saved weights, updates that are exactly zero)",
               "shown so a partial diagnosis is never read as a full one"),
    "MRG004": ("warning: the candidate's storage dtype (bf16/fp16) cannot hold the update exactly; the merge lost "
               "no more than that rounding", "peft #1388: a bf16 save moves the loss by rounding alone; shown, not failed"),
    "MRG005": ("scaled: adapted weights changed by k x an adapter's update with k != 1 (2: merged twice; sqrt(r): "
               "rsLoRA's scale confused with alpha/r)", "a merge script that applies the LoRA scale wrong or twice"),
    "MRG006": ("transposed: square weights changed by the transpose of the update",
               "fan_in_fan_out set wrong for the layer, or a hand-written merge that adds (B @ A).T"),
    "MRG007": ("missing: adapted weights hold the base's values (no change beyond rounding where the update is not "
               "zero)", "a module-name matching bug skips modules (axolotl's rstrip('.weight')); the base saved as "
                        "the merge (unsloth #1352, MiniCPM-V #559, vLLM #22884)"),
    "MRG008": ("foreign: adapted weights changed in a way the update does not explain (correlation shown)",
               "a merge into a quantization-rounded (4-bit) base, another adapter, or another base (peft #2321)"),
    "MRG009": ("untouched but changed: tensors no adapter updates differ from the base beyond rounding",
               "a merge into a dequantized 4-bit base, or into another base than --llm-base"),
    "MRG010": ("overflow: adapted weights hold Inf/NaN", "a large update merged in float16, whose range is ±65504"),
    "MRG011": ("warning: tensors no adapter updates were rounded through a 16-bit float their storage dtype does not "
               "force", "a float32 release made from a bfloat16/float16 load; shown, not failed"),
    "MRG012": ("warning: rounded as MRG001, but the share lost is within --llm-audit-max-error",
               "a float16 (or TF32) product of a large update: real, small; shown, not failed"),
    "SAF001": ("pickle-only weights refused (allow with --llm-allow-pickle)",
               "pickle files run code when loaded"),
    "SAF002": ("auto_map custom code refused (allow with --llm-trust-remote-code)",
               "custom modeling code runs at load time"),
}
