"""Hugging Face `config.json` <-> `ModelConfig`, for the architectures this framework runs.

Supported `model_type`s: gpt2, llama (Llama 2 and 3.x, with Llama 3.1's RoPE scaling),
mistral (with or without a sliding window), qwen2 (Qwen2/2.5), qwen3 (dense Qwen3: per-head
q/k RMSNorm), gemma2 and gemma3_text (Gemma 3's text models, `Gemma3ForCausalLM`). A field
whose value would change what the model computes and that `ModelConfig` cannot express
(Qwen2's sliding window, biases on other projections, another activation or RoPE scaling,
local and global layers in no regular pattern) is an error naming the file and the field,
never silently dropped. Both spellings of RoPE settings are read: the `rope_theta` /
`rope_scaling` (and Gemma 3's `rope_local_base_freq`) fields of transformers 4 checkpoints
and the `rope_parameters` dict of transformers 5 (for Gemma 3, one per layer type).
A field missing from config.json takes transformers' default for the model type.
"""

from __future__ import annotations

import json
import os
from typing import Any

from rlhf_jax import errors
from rlhf_jax.models import ModelConfig

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
ARCHITECTURES = {
  "gpt2": "GPT2LMHeadModel",
  "llama": "LlamaForCausalLM",
  "mistral": "MistralForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
  "gemma2": "Gemma2ForCausalLM",
  "gemma3_text": "Gemma3ForCausalLM",
}
SEQUENCE_CLASSIFIERS = {
  "gpt2": "GPT2ForSequenceClassification",
  "llama": "LlamaForSequenceClassification",
  "mistral": "MistralForSequenceClassification",
  "qwen2": "Qwen2ForSequenceClassification",
  "qwen3": "Qwen3ForSequenceClassification",
  "gemma2": "Gemma2ForSequenceClassification",
  "gemma3_text": "Gemma3TextForSequenceClassification",
}
# GPT-2's (and Gemma's) tanh-approximated GELU under its names in transformers.
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
GEMMA = ("gemma2", "gemma3_text")
# transformers' defaults (Gemma2Config, Gemma3TextConfig) for the fields that change what a
# Gemma model computes, used when config.json leaves one out.
GEMMA_DEFAULTS = {
  "gemma2": {
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 8192,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
  },
  "gemma3_text": {
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 131_072,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
  },
}
LOCAL, GLOBAL = "sliding_attention", "full_attention"  # `layer_types` entries


def read(directory: str) -> dict[str, Any]:
  """The `config.json` of a Hugging Face model directory, as a dict."""
  path = os.path.join(directory, "config.json")
  try:
    with open(path) as f:
      hf = json.load(f)
  except FileNotFoundError:
    raise errors.DataError(path, 0, "no such file (not a Hugging Face model directory)") from None
  except (OSError, ValueError) as error:
    raise errors.DataError(path, 0, f"not a readable config.json: {error}") from None
  if not isinstance(hf, dict):
    raise errors.DataError(path, 0, "expected a JSON object")
  return hf


# Where an exported reward model keeps the constant its scores are shifted by: a Hugging
# Face sequence classifier's score has no bias (read back by `hf.load_reward_model`).
SCORE_OFFSET = "rlhf_jax_score_offset"


def is_classifier(hf: dict[str, Any], path: str = "config.json") -> bool:
  """Whether config.json describes a sequence classifier (a reward model); one with more
  than one label is an error naming `id2label`."""
  archs = hf.get("architectures") or []
  if not any(str(a).endswith("ForSequenceClassification") for a in archs):
    return False
  labels = hf.get("id2label") or {"0": "LABEL_0"}
  if len(labels) != 1:
    raise errors.DataError(
      path, 0, f"a reward model scores with one label; this classifier has {len(labels)}",
      field="id2label",
    )  # fmt: skip
  return True


def to_model_config(hf: dict[str, Any], path: str = "config.json", **overrides) -> ModelConfig:
  """The `ModelConfig` of a Hugging Face config (`overrides`: dtype, param_dtype, remat,
  scan_layers and other fields that do not change the architecture)."""

  def fail(field: str, message: str):
    raise errors.DataError(path, 0, message, field=field)

  kind = hf.get("model_type")
  if kind not in SUPPORTED:
    fail("model_type", f"model_type {kind!r} is not supported; supported: {', '.join(SUPPORTED)}")

  def need(field: str, *names: str):
    for name in (field, *names):
      if hf.get(name) is not None:
        return hf[name]
    fail(field, f"missing field {field!r}")

  def refuse(field: str, ok, why: str):
    value = hf.get(field)
    if value is not None and not ok(value):
      fail(field, f"{field}={value!r} is not supported: {why}")

  vocab = int(need("vocab_size"))
  tie = bool(hf.get("tie_word_embeddings", True))
  if kind in GEMMA:
    fields = _gemma(hf, kind, fail, need, refuse)
  elif kind == "gpt2":
    d = int(need("n_embd"))
    refuse("activation_function", lambda v: v in GELU_TANH, "GPT-2 blocks use the tanh GELU")
    refuse("scale_attn_by_inverse_layer_idx", lambda v: not v, "attention scaled per layer")
    refuse("scale_attn_weights", bool, "unscaled attention logits")
    refuse("add_cross_attention", lambda v: not v, "cross-attention (an encoder-decoder)")
    fields = dict(
      vocab_size=vocab,
      d_model=d,
      num_layers=int(need("n_layer")),
      num_heads=int(need("n_head")),
      mlp_dim=int(hf.get("n_inner") or 4 * d),
      max_len=int(need("n_positions")),
      position="learned",
      norm="layernorm",
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      mlp="gelu",
      tie_embeddings=True,
      qkv_bias=True,
      use_bias=True,
    )
  else:
    refuse("hidden_act", lambda v: v == "silu", "these models use SiLU-gated MLPs")
    refuse("attention_bias", lambda v: not v, "biases on q/k/v/o projections")
    refuse("mlp_bias", lambda v: not v, "biases on MLP projections")
    qwen = kind in ("qwen2", "qwen3")
    window = 0
    if kind == "mistral":  # every layer local; MistralConfig's default window is 4096
      window = int(hf.get("sliding_window", 4096) or 0)
    else:
      refuse("sliding_window", lambda v: qwen and not hf.get("use_sliding_window"),
             "sliding-window attention is implemented for Mistral and Gemma only; a "
             "checkpoint whose window is not used (sliding_window null) imports")  # fmt: skip
      refuse("use_sliding_window", lambda v: not v,
             "Qwen's sliding-window layers are not implemented")  # fmt: skip
    d = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    fields = dict(
      vocab_size=vocab,
      d_model=d,
      num_layers=int(need("num_hidden_layers")),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or d // heads),
      mlp_dim=int(need("intermediate_size")),
      max_len=int(hf.get("max_position_embeddings", 2048)),
      position="rope",
      norm="rmsnorm",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      mlp="swiglu",
      tie_embeddings=tie,
      qkv_bias=kind == "qwen2",
      qk_norm=kind == "qwen3",
      use_bias=False,
      sliding_window=window,
      **_rope(hf, fail),
    )
  try:
    return ModelConfig(**{**fields, **overrides})
  except ValueError as error:
    fail("model_type", str(error))


def _gemma(hf: dict[str, Any], kind: str, fail, need, refuse) -> dict[str, Any]:
  """The ModelConfig fields of a Gemma 2 or Gemma 3 (text) config."""
  defaults = GEMMA_DEFAULTS[kind]
  get = lambda name: hf[name] if name in hf else defaults[name]
  refuse("hidden_activation", lambda v: v in GELU_TANH, "Gemma's MLP is GeGLU with tanh GELU")
  refuse("attention_bias", lambda v: not v, "biases on q/k/v/o projections")
  refuse("use_bidirectional_attention", lambda v: not v, "bidirectional attention")
  d = int(need("hidden_size"))
  heads = int(need("num_attention_heads"))
  head_dim = int(get("head_dim") or d // heads)
  num_layers = int(need("num_hidden_layers"))
  window, pattern = _layer_pattern(hf, kind, num_layers, fail)
  scalar = float(get("query_pre_attn_scalar"))
  if kind == "gemma2":
    rope = _rope(hf, fail)
  else:
    rope = _gemma3_rope(hf, fail, local=window > 0)
  return dict(
    vocab_size=int(need("vocab_size")),
    d_model=d,
    num_layers=num_layers,
    num_heads=heads,
    num_kv_heads=int(get("num_key_value_heads") or heads),
    head_dim=head_dim,
    mlp_dim=int(need("intermediate_size")),
    max_len=int(get("max_position_embeddings")),
    position="rope",
    norm="rmsnorm",
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    mlp="geglu",
    tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    qk_norm=kind == "gemma3_text",
    embed_scale=True,
    zero_centered_norm=True,
    post_norms=True,
    query_pre_attn_scalar=0.0 if scalar == head_dim else scalar,
    # transformers' Gemma 3 attention does not apply attn_logit_softcapping (its checkpoints
    # set it to null): it changes nothing there, so it is not read.
    attn_logit_softcap=float(get("attn_logit_softcapping") or 0) if kind == "gemma2" else 0.0,
    final_logit_softcap=float(get("final_logit_softcapping") or 0),
    sliding_window=window,
    sliding_window_pattern=pattern,
    **rope,
  )


def _layer_pattern(hf: dict[str, Any], kind: str, num_layers: int, fail) -> tuple[int, int]:
  """(sliding_window, sliding_window_pattern) from `layer_types`, or from the pattern
  transformers applies without it (Gemma 2: every other layer local; Gemma 3: all but
  every `sliding_window_pattern`-th, 6 by default)."""
  types = hf.get("layer_types")
  if types is None:
    p = 2 if kind == "gemma2" else int(hf.get("sliding_window_pattern") or 6)
    types = [LOCAL if (i + 1) % p else GLOBAL for i in range(num_layers)]
  if not isinstance(types, list) or len(types) != num_layers or set(types) - {LOCAL, GLOBAL}:
    fail("layer_types", f"layer_types must name {LOCAL!r} or {GLOBAL!r} for each of the "
         f"{num_layers} layers")  # fmt: skip
  local = [t == LOCAL for t in types]
  if not any(local):
    return 0, 0
  window = hf.get("sliding_window", GEMMA_DEFAULTS[kind]["sliding_window"])
  if not window:
    fail("sliding_window", "layer_types has sliding-window layers but no sliding_window")
  if all(local):
    return int(window), 0
  p = local.index(False) + 1
  if local != [(i + 1) % p != 0 for i in range(num_layers)]:
    fail("layer_types", f"layer_types={types!r} is not supported: global layers must come "
         "every p-th layer (p-1, 2p-1, ...)")  # fmt: skip
  return int(window), p


def _gemma3_rope(hf: dict[str, Any], fail, local: bool) -> dict[str, Any]:
  """Gemma 3's RoPE: `rope_parameters` per layer type (transformers 5), or `rope_theta` and
  `rope_scaling` for the global layers and `rope_local_base_freq` for the local ones."""
  params = hf.get("rope_parameters")
  if params is not None:
    field = "rope_parameters"
    if not isinstance(params, dict) or not {LOCAL, GLOBAL} >= set(params):
      fail(field, f"expected RoPE parameters per layer type ({GLOBAL!r}, {LOCAL!r})")
    full, sliding = dict(params.get(GLOBAL) or {}), dict(params.get(LOCAL) or {})
  else:
    field = "rope_scaling"
    full, sliding = dict(hf.get("rope_scaling") or {}), {}
    if hf.get("rope_theta") is not None:
      full["rope_theta"] = hf["rope_theta"]
    if hf.get("rope_local_base_freq") is not None:
      sliding["rope_theta"] = hf["rope_local_base_freq"]
  full.setdefault("rope_theta", 1_000_000.0)
  sliding.setdefault("rope_theta", 10_000.0)
  glob = _rope_fields(full, field, fail)
  loc = _rope_fields(sliding, field, fail)
  if not local or loc == glob:
    return glob
  if set(loc) != {"rope_theta"}:
    fail(field, "RoPE scaling on the sliding-window layers is not supported (only on the "
         "global ones)")  # fmt: skip
  return {**glob, "rope_local_theta": loc["rope_theta"]}


def _rope(hf: dict[str, Any], fail) -> dict[str, Any]:
  """RoPE fields from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
  params = hf.get("rope_parameters")
  field = "rope_parameters"
  if not isinstance(params, dict):
    params = dict(hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    field = "rope_scaling"
  return _rope_fields(params, field, fail)


def _rope_fields(params: dict[str, Any], field: str, fail) -> dict[str, Any]:
  """ModelConfig's RoPE fields from one set of Hugging Face RoPE parameters."""
  kind = params.get("rope_type", params.get("type", "default"))
  out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", 10_000.0))}
  if kind == "default":
    return out
  if kind == "linear":
    return {**out, "rope_scaling": "linear", "rope_factor": float(params["factor"])}
  if kind == "llama3":
    try:
      return {
        **out,
        "rope_scaling": "llama3",
        "rope_factor": float(params["factor"]),
        "rope_low_freq_factor": float(params["low_freq_factor"]),
        "rope_high_freq_factor": float(params["high_freq_factor"]),
        "rope_original_max_len": int(params["original_max_position_embeddings"]),
      }
    except KeyError as missing:
      fail(field, f"{field} of type 'llama3' misses {missing}")
  fail(field, f"RoPE type {kind!r} is not supported (supported: default, linear, llama3)")


def from_model_config(cfg: ModelConfig, kind: str, *, classifier: bool = False) -> dict[str, Any]:
  """A Hugging Face config dict for `cfg` as a `kind` model (`to_model_config`'s inverse);
  `classifier`: a one-label sequence classifier (a reward model) instead of a causal LM."""
  if kind not in SUPPORTED:
    raise ValueError(f"Cannot export as {kind!r}; supported: {SUPPORTED}.")
  arch = (SEQUENCE_CLASSIFIERS if classifier else ARCHITECTURES)[kind]
  base: dict[str, Any] = {"architectures": [arch], "model_type": kind, "vocab_size": cfg.vocab_size}
  if classifier:
    base.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  if kind == "gpt2":
    return {
      **base,
      "n_embd": cfg.d_model,
      "n_layer": cfg.num_layers,
      "n_head": cfg.num_heads,
      "n_inner": cfg.mlp_dim,
      "n_positions": cfg.max_len,
      "layer_norm_epsilon": cfg.norm_eps,
      "activation_function": "gelu_new",
      "tie_word_embeddings": True,
    }
  rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
  if cfg.rope_scaling == "linear":
    rope.update(rope_type="linear", factor=cfg.rope_factor)
  elif cfg.rope_scaling == "llama3":
    rope.update(
      rope_type="llama3",
      factor=cfg.rope_factor,
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_len,
    )
  out = {
    **base,
    "hidden_size": cfg.d_model,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.kv_heads,
    "head_dim": cfg.head_size,
    "intermediate_size": cfg.mlp_dim,
    "max_position_embeddings": cfg.max_len,
    "rms_norm_eps": cfg.norm_eps,
    "hidden_act": "silu",
    "tie_word_embeddings": cfg.tie_embeddings,
    # Both spellings, so transformers 4 and 5 read the same RoPE.
    "rope_theta": cfg.rope_theta,
    "rope_scaling": None if rope["rope_type"] == "default" else dict(rope),
    "rope_parameters": rope,
  }
  if kind in GEMMA:
    del out["hidden_act"]  # Gemma names it hidden_activation
    return {**out, **_gemma_fields(cfg, kind, rope)}
  if kind in ("qwen2", "qwen3"):
    out["use_sliding_window"] = False
  if kind != "qwen2":
    out.update(attention_bias=False, mlp_bias=False)
  if kind == "mistral":
    out["sliding_window"] = cfg.sliding_window or None
  return out


def _whole(x: float) -> int | float:
  """An int where transformers declares one (its configs are type-checked)."""
  return int(x) if float(x).is_integer() else x


def _gemma_fields(cfg: ModelConfig, kind: str, rope: dict[str, Any]) -> dict[str, Any]:
  """The Gemma-specific part of `from_model_config` (its RoPE for Gemma 3: per layer type)."""
  types = [LOCAL if is_local else GLOBAL for is_local in cfg.local_layers()]
  out = {
    "hidden_activation": "gelu_pytorch_tanh",
    "attention_bias": False,
    "use_bidirectional_attention": False,
    "query_pre_attn_scalar": _whole(cfg.query_pre_attn_scalar or cfg.head_size),
    "final_logit_softcapping": cfg.final_logit_softcap or None,
    "attn_logit_softcapping": cfg.attn_logit_softcap or None,
    # transformers builds the sliding mask whether or not a layer uses it: never null.
    "sliding_window": cfg.sliding_window or cfg.max_len,
    "layer_types": types,
  }
  if kind == "gemma3_text":
    local_rope = dict(rope)
    if cfg.rope_local_theta:
      local_rope = {"rope_theta": cfg.rope_local_theta, "rope_type": "default"}
    # transformers 4 reads the pattern: every p-th layer global (L + 1: none is).
    pattern = cfg.sliding_window_pattern
    if LOCAL not in types:
      pattern = 1
    elif GLOBAL not in types:
      pattern = cfg.num_layers + 1
    out.update(
      rope_parameters={GLOBAL: rope, LOCAL: local_rope},
      rope_local_base_freq=local_rope["rope_theta"],
      sliding_window_pattern=pattern,
    )
  return out


def architecture_of(cfg: ModelConfig) -> str:
  """The Hugging Face `model_type` a ModelConfig exports as (gpt2, llama, mistral, qwen2,
  qwen3, gemma2, gemma3_text)."""
  gemma_only = (cfg.zero_centered_norm, cfg.post_norms, cfg.query_pre_attn_scalar,
                cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.rope_local_theta)  # fmt: skip
  local = cfg.local_layers()
  plain = not any(gemma_only) and not any(local)
  if cfg.position == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu":
    if cfg.qkv_bias and cfg.use_bias and cfg.tie_embeddings and plain:
      return "gpt2"
  elif cfg.position == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
    if not cfg.use_bias and not cfg.embed_scale and not any(gemma_only):
      if not any(local) and not (cfg.qkv_bias and cfg.qk_norm):
        return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
      if all(local) and not cfg.qkv_bias and not cfg.qk_norm:
        return "mistral"
  elif cfg.position == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "geglu":
    gemma = cfg.embed_scale and cfg.zero_centered_norm and cfg.post_norms
    if gemma and not cfg.use_bias and not cfg.qkv_bias:
      if cfg.qk_norm and not cfg.attn_logit_softcap:
        return "gemma3_text"
      if not cfg.qk_norm and not cfg.rope_local_theta:
        return "gemma2"
  raise ValueError(
    "This model has no Hugging Face architecture to export as: GPT-2 needs learned "
    "positions, LayerNorm, GELU, biases and tied embeddings; Llama/Qwen2 need RoPE, RMSNorm, "
    "SwiGLU and no output biases (Mistral: a sliding window on every layer); Gemma 2/3 need "
    "GeGLU, the embedding scale, zero-centred and post norms (Gemma 3: q/k norms and no "
    "attention soft-cap; Gemma 2: one RoPE base)."
  )
