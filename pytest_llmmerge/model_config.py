"""config.json as transformers resolves it, whichever version wrote it: which keys matter to a
forward pass (the tables CFG007/CFG008 are decided by), and where the rope parameters are.

:meth:`pytest_llmmerge.checkpoint.Checkpoint.architecture` puts these together.
"""

from __future__ import annotations

from typing import Any

# Where config.json names the dtype: transformers 5 writes "dtype", 4.x wrote "torch_dtype".
CONFIG_DTYPE_KEYS = ("dtype", "torch_dtype")
# config.json keys no forward pass reads, or that other checks own: a save may change, add or
# drop them (transformers 4.x configs carried generation defaults and pretraining_tp; 5.x writes
# dtype) without changing the model.  Rope keys are compared through their resolved values.
CONFIG_KEYS_IGNORED = frozenset({
    "transformers_version", "_name_or_path", "_commit_hash", *CONFIG_DTYPE_KEYS, "architectures", "model_type",
    "auto_map", "vocab_size", "tie_word_embeddings", "quantization_config", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "torchscript", "attn_implementation", "_attn_implementation",
    "_attn_implementation_autoset", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
    "sep_token_id", "decoder_start_token_id", "pretraining_tp", "id2label", "label2id", "problem_type",
    "finetuning_task", "task_specific_params", "tokenizer_class", "prefix", "keys_to_ignore_at_inference",
    "use_bfloat16", "tf_legacy_loss", "chunk_size_feed_forward", "is_decoder", "is_encoder_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "pruned_heads",
    "rope_theta", "rope_scaling", "rope_parameters", "rope_local_base_freq", "partial_rotary_factor",
    "attention_dropout", "hidden_dropout", "dropout", "embd_pdrop", "resid_pdrop", "attn_pdrop",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})
# Keys whose value decides shapes or the arithmetic of a forward pass: a different value on both
# sides is an error.  Other differing keys are shown as warnings.
CONFIG_KEYS_COMPUTED = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
    "head_dim", "tie_word_embeddings", "rope", "hidden_act", "hidden_activation", "activation_function",
    "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "sliding_window", "layer_types",
    "use_sliding_window", "max_window_layers", "sliding_window_pattern", "attention_bias", "mlp_bias",
    "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "num_experts",
    "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
    "norm_topk_prob", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "rotary_pct", "rotary_emb_base",
    "use_parallel_residual", "scale_embedding", "embedding_multiplier", "logits_scaling", "residual_multiplier",
    "attention_multiplier", "qk_layernorm", "position_embedding_type",
})


def rope_parameters(config: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """Rotary-embedding parameters per attention layer type ("" when one set serves all), from
    wherever the writing version put them: v4's top-level rope_theta, rope_scaling and (Gemma)
    rope_local_base_freq for sliding layers; v5's rope_parameters, flat or one dict per layer
    type.  Identical sets collapse into "".  None when no rope setting is stated."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        layers = {str(k): dict(v) for k, v in params.items()}
    else:
        flat = dict(params) if isinstance(params, dict) else {}
        local = config.get("rope_local_base_freq")
        layers = {"full_attention": flat, "sliding_attention": {**flat, "rope_theta": local}} \
            if local is not None else {"": flat}
    legacy = config.get("rope_scaling")
    for values in layers.values():
        for key, value in (legacy.items() if isinstance(legacy, dict) else ()):
            values.setdefault(key, value)
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in config:
                values.setdefault(key, config[key])
        if "type" in values:  # v4's older spelling
            values.setdefault("rope_type", values.pop("type"))
    if not any(values for values in layers.values()):
        return None
    for values in layers.values():
        values.setdefault("rope_type", "default")
    first = next(iter(layers.values()))
    return {"": first} if all(values == first for values in layers.values()) else layers
