"""Hugging Face `config.json` <-> `ModelConfig`, for the architectures this framework runs.

Supported `model_type`s: gpt2, llama (Llama 2 and 3.x, with Llama 3.1's RoPE scaling),
mistral (without a sliding window), qwen2 (Qwen2/2.5) and qwen3 (dense Qwen3: per-head
q/k RMSNorm). A field whose value would change
what the model computes and that `ModelConfig` cannot express (a sliding window, biases
on other projections, another activation or RoPE scaling) is an error naming the file and
the field, never silently dropped. Both spellings of RoPE settings are read: the
`rope_theta` / `rope_scaling` fields of transformers 4 checkpoints and the
`rope_parameters` dict of transformers 5.
"""

from __future__ import annotations

import json
import os
from typing import Any

from rlhf_jax import errors
from rlhf_jax.models import ModelConfig

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {
  "gpt2": "GPT2LMHeadModel",
  "llama": "LlamaForCausalLM",
  "mistral": "MistralForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
}
SEQUENCE_CLASSIFIERS = {
  "gpt2": "GPT2ForSequenceClassification",
  "llama": "LlamaForSequenceClassification",
  "mistral": "MistralForSequenceClassification",
  "qwen2": "Qwen2ForSequenceClassification",
  "qwen3": "Qwen3ForSequenceClassification",
}
# GPT-2's tanh-approximated GELU under its names in transformers.
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


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
  if kind == "gpt2":
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
    refuse("sliding_window", lambda v: qwen and not hf.get("use_sliding_window"),
           "sliding-window attention is not implemented; a checkpoint whose window is "
           "not used (sliding_window null) imports")  # fmt: skip
    refuse("use_sliding_window", lambda v: not v, "sliding-window attention is not implemented")
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
      **_rope(hf, fail),
    )
  try:
    return ModelConfig(**{**fields, **overrides})
  except ValueError as error:
    fail("model_type", str(error))


def _rope(hf: dict[str, Any], fail) -> dict[str, Any]:
  """RoPE fields from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
  params = hf.get("rope_parameters")
  field = "rope_parameters"
  if not isinstance(params, dict):
    params = dict(hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    field = "rope_scaling"
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
  if kind in ("qwen2", "qwen3"):
    out["use_sliding_window"] = False
  if kind != "qwen2":
    out.update(attention_bias=False, mlp_bias=False)
  if kind == "mistral":
    out["sliding_window"] = None
  return out


def architecture_of(cfg: ModelConfig) -> str:
  """The Hugging Face `model_type` a ModelConfig exports as (gpt2, llama, qwen2, qwen3)."""
  if cfg.position == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu":
    if cfg.qkv_bias and cfg.use_bias and cfg.tie_embeddings:
      return "gpt2"
  elif cfg.position == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
    if not cfg.use_bias and not cfg.embed_scale and not (cfg.qkv_bias and cfg.qk_norm):
      return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
  raise ValueError(
    "This model has no Hugging Face architecture to export as: GPT-2 needs learned "
    "positions, LayerNorm, GELU, biases and tied embeddings; Llama/Qwen2 need RoPE, RMSNorm, "
    "SwiGLU and no output biases."
  )
