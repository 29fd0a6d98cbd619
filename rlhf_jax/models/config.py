"""Model configuration: one dataclass covers GPT-2 and Llama/Gemma/Qwen-style decoders.

Presets are looked up by name (`get_model_config("gpt2-small")`), so configs,
benchmarks and checkpoint importers agree on the architecture of a named model.
Analytic parameter and FLOP counts live here because MFU needs them and they
depend only on the architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rlhf_jax import config_spec as cs
from rlhf_jax.errors import ConfigError

_CHOICES = {
  "position": ("learned", "rope"),
  "rope_scaling": ("none", "linear", "llama3"),
  "norm": ("layernorm", "rmsnorm"),
  "mlp": ("gelu", "swiglu", "geglu"),
  "remat": ("none", "full", "dots"),
  "dtype": ("float32", "bfloat16", "float16"),
  "param_dtype": ("float32", "bfloat16"),
  "attention_impl": ("xla", "fused", "auto"),
}
_NON_NEGATIVE = (
  "query_pre_attn_scalar",
  "attn_logit_softcap",
  "final_logit_softcap",
  "sliding_window",
  "sliding_window_pattern",
  "rope_local_theta",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer.

  GPT-2 style: position="learned", norm="layernorm", mlp="gelu", qkv_bias and
  use_bias True, tie_embeddings True. Llama style: position="rope",
  norm="rmsnorm", mlp="swiglu", num_kv_heads < num_heads (grouped-query
  attention), no biases. Qwen2 adds qkv_bias, Qwen3 qk_norm; Gemma adds embed_scale and
  geglu; Gemma 2/3 also zero_centered_norm, post_norms, query_pre_attn_scalar, soft-capping
  and sliding-window layers (Mistral: sliding_window on every layer).
  """

  vocab_size: int = 256
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 0  # 0 means num_heads (multi-head attention)
  head_dim: int = 0  # 0 means d_model // num_heads
  mlp_dim: int = 256
  max_len: int = 512  # size of the learned position table; RoPE has no limit
  position: str = "rope"
  rope_theta: float = 10_000.0
  # RoPE frequency scaling for long contexts, as in Hugging Face's `rope_scaling`:
  # "linear" divides every frequency by rope_factor; "llama3" (Llama 3.1+) divides the
  # low frequencies by it, keeps the high ones and blends those in between, by wavelength
  # against rope_original_max_len / rope_{low,high}_freq_factor.
  rope_scaling: str = "none"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm: str = "rmsnorm"
  norm_eps: float = 1e-6
  mlp: str = "swiglu"
  tie_embeddings: bool = True
  qkv_bias: bool = False  # bias on q, k, v projections (GPT-2, Qwen2)
  qk_norm: bool = False  # RMSNorm of each head's query and key before RoPE (Qwen3)
  use_bias: bool = False  # bias on attention output and MLP projections (GPT-2)
  embed_scale: bool = False  # multiply embeddings by sqrt(d_model) (Gemma)
  # RMSNorms (q/k norms too) multiply by (1 + scale), scale stored zero-centred and
  # initialised at 0 (Gemma's convention; a checkpoint's weights are kept as they are).
  zero_centered_norm: bool = False
  # Sandwich norms: an RMSNorm on the attention and on the MLP output before each
  # residual add (Gemma 2/3), besides the norms on their inputs.
  post_norms: bool = False
  query_pre_attn_scalar: float = 0.0  # attention logits * this**-0.5; 0 means head_dim
  attn_logit_softcap: float = 0.0  # cap * tanh(logits / cap) on attention logits; 0: off
  final_logit_softcap: float = 0.0  # the same on the output logits (Gemma 2); 0: off
  # Local attention: a query sees the `sliding_window` latest keys, itself included
  # (0: off). With sliding_window_pattern p > 0, every p-th layer (p-1, 2p-1, ...) attends
  # globally instead (Gemma 2: 2, Gemma 3: 6); with 0 every layer is local (Mistral).
  sliding_window: int = 0
  sliding_window_pattern: int = 0
  # RoPE base of the local layers, which then use no rope_scaling (Gemma 3's
  # rope_local_base_freq); 0: the same RoPE as the global layers.
  rope_local_theta: float = 0.0
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # "full": recompute the block; "dots": keep matmul outputs
  scan_layers: bool = True
  # The attention kernel (transformer.attention_kernel). "xla": einsums and a float32
  # softmax, every feature. "fused": jax.nn.dot_product_attention, as cuDNN's flash attention
  # where that takes the case (a CUDA GPU, 16-bit dtype, head_dim a multiple of 8, even
  # lengths), else as JAX's XLA implementation; no attention soft-cap. "auto": "fused" where
  # cuDNN takes the case, else "xla", so one config runs anywhere.
  attention_impl: str = "xla"
  # Low-rank adapters (rlhf_jax/models/lora.py): rank 0 means none. Each projection named in
  # lora_targets (comma-separated: q, k, v, o, up, gate, down) adds (alpha / rank) x A B,
  # with dropout on the adapter's input in training.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: str = "q,k,v,o,up,gate,down"

  def __post_init__(self):
    for field, choices in _CHOICES.items():
      value = getattr(self, field)
      if value not in choices:
        raise ValueError(f"ModelConfig.{field}={value!r}; expected one of {choices}.")
    if self.d_model % self.num_heads and not self.head_dim:
      raise ValueError(
        f"ModelConfig.d_model={self.d_model} is not divisible by num_heads="
        f"{self.num_heads}; set head_dim explicitly."
      )
    if self.num_heads % self.kv_heads:
      raise ValueError(
        f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
        f"num_kv_heads={self.kv_heads}."
      )
    if self.position == "rope" and self.head_size % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_size}.")
    if self.zero_centered_norm and self.norm != "rmsnorm":
      raise ValueError("ModelConfig.zero_centered_norm needs norm='rmsnorm'.")
    for field in _NON_NEGATIVE:
      if getattr(self, field) < 0:
        raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r} must be >= 0.")
    if self.attention_impl == "fused" and self.attn_logit_softcap:
      # Never expressible: the kernel takes logits only through an additive bias.
      raise ValueError(
        f"ModelConfig.attention_impl='fused' cannot soft-cap attention logits "
        f"(attn_logit_softcap={self.attn_logit_softcap}): jax.nn.dot_product_attention has no "
        "soft-cap. Use attention_impl='auto' (the einsum path wherever the cap is on) or 'xla'."
      )

  def local_layers(self) -> tuple[bool, ...]:
    """Per layer, whether it attends within the sliding window."""
    p = self.sliding_window_pattern
    return tuple(
      bool(self.sliding_window) and (p == 0 or (i + 1) % p != 0) for i in range(self.num_layers)
    )

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  def replace(self, **overrides: Any) -> ModelConfig:
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  # --- analytic counts -------------------------------------------------------

  def num_params(self, *, include_embeddings: bool = True) -> int:
    """Exact number of parameters of the language model (trunk + LM head)."""
    d, h, n, k, f = self.d_model, self.head_size, self.num_heads, self.kv_heads, self.mlp_dim
    norm = d * (2 if self.norm == "layernorm" else 1)
    attn = d * n * h + 2 * d * k * h + n * h * d
    if self.qkv_bias:
      attn += n * h + 2 * k * h
    if self.qk_norm:
      attn += 2 * h
    if self.use_bias:
      attn += d
    gated = self.mlp in ("swiglu", "geglu")
    mlp = (3 if gated else 2) * d * f
    if self.use_bias:
      mlp += (2 * f if gated else f) + d
    block = attn + mlp + (4 if self.post_norms else 2) * norm
    total = self.num_layers * block + norm
    if include_embeddings:
      total += self.vocab_size * d
      if self.position == "learned":
        total += self.max_len * d
    if not self.tie_embeddings:
      total += d * self.vocab_size
    return total

  def matmul_params(self) -> int:
    """Parameters that take part in a matmul per token (excludes lookups)."""
    d, h, n, k, f = self.d_model, self.head_size, self.num_heads, self.kv_heads, self.mlp_dim
    attn = 2 * d * n * h + 2 * d * k * h
    mlp = (3 if self.mlp in ("swiglu", "geglu") else 2) * d * f
    return self.num_layers * (attn + mlp) + d * self.vocab_size  # + the LM head

  def train_flops_per_token(self, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 * matmul params + attention scores.

    The attention term, 12 * L * T * N * H, counts QK^T and AV over the full
    T x T square (the convention of PaLM and MaxText, no causal halving).
    """
    attn = 12 * self.num_layers * seq_len * self.num_heads * self.head_size
    return 6.0 * self.matmul_params() + attn

  def decode_flops_per_token(self, context_len: int) -> float:
    """Forward FLOPs for one decoded token attending to `context_len` slots."""
    attn = 4 * self.num_layers * context_len * self.num_heads * self.head_size
    return 2.0 * self.matmul_params() + attn


# Published architectures (vocabulary sizes as released) and small ones for tests.
PRESETS: dict[str, dict[str, Any]] = {
  # A few hundred thousand parameters: unit tests and the testbed on CPU.
  "tiny": dict(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=192),
  "tiny-gpt2": dict(
    vocab_size=256,
    d_model=64,
    num_layers=2,
    num_heads=4,
    mlp_dim=256,
    max_len=256,
    position="learned",
    norm="layernorm",
    norm_eps=1e-5,
    mlp="gelu",
    qkv_bias=True,
    use_bias=True,
  ),
  # Around 100M parameters (Llama layout, 32k vocabulary).
  "llama-100m": dict(
    vocab_size=32_000, d_model=768, num_layers=10, num_heads=12, num_kv_heads=4, mlp_dim=2048
  ),
  "gpt2-small": dict(
    vocab_size=50_257,
    d_model=768,
    num_layers=12,
    num_heads=12,
    mlp_dim=3072,
    max_len=1024,
    position="learned",
    norm="layernorm",
    norm_eps=1e-5,
    mlp="gelu",
    qkv_bias=True,
    use_bias=True,
  ),
  "gpt2-medium": dict(
    vocab_size=50_257,
    d_model=1024,
    num_layers=24,
    num_heads=16,
    mlp_dim=4096,
    max_len=1024,
    position="learned",
    norm="layernorm",
    norm_eps=1e-5,
    mlp="gelu",
    qkv_bias=True,
    use_bias=True,
  ),
  "qwen2.5-0.5b": dict(
    vocab_size=151_936,
    d_model=896,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    mlp_dim=4864,
    rope_theta=1_000_000.0,
    qkv_bias=True,
  ),
  "llama3.2-1b": dict(
    vocab_size=128_256,
    d_model=2048,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    mlp_dim=8192,
    rope_theta=500_000.0,
    norm_eps=1e-5,
  ),
  "gemma-2b": dict(
    vocab_size=256_000,
    d_model=2048,
    num_layers=18,
    num_heads=8,
    num_kv_heads=1,
    head_dim=256,
    mlp_dim=16_384,
    mlp="geglu",
    embed_scale=True,
  ),
}


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
  """Returns the preset `name` with `overrides` applied (e.g. dtype="bfloat16")."""
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; known: {sorted(PRESETS)}.")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"Unknown ModelConfig field(s) {unknown}; known: {sorted(fields)}.")
  return ModelConfig(**{**PRESETS[name], **overrides})


def _check_model(section: Any, prefix: str) -> None:
  """The section builds a valid ModelConfig (heads divide d_model, even RoPE dims, ...)."""
  fields = {k: v for k, v in section.items() if k != "preset"}
  fields.setdefault("vocab_size", 256)  # set from the tokenizer by the trainer
  try:
    get_model_config(section["preset"], **fields)
  except ValueError as error:
    raise ConfigError(f"{prefix}: {error}") from None


# A `model` config section: `preset` plus any ModelConfig fields to override.
CONFIG_SPEC = cs.Spec(
  {
    "preset": cs.Choice(*PRESETS),
    "vocab_size": cs.Int(min=1),
    "d_model": cs.Int(min=1),
    "num_layers": cs.Int(min=1),
    "num_heads": cs.Int(min=1),
    "num_kv_heads": cs.Int(min=0),
    "head_dim": cs.Int(min=0),
    "mlp_dim": cs.Int(min=1),
    "max_len": cs.Int(min=1),
    "position": cs.Choice(*_CHOICES["position"]),
    "rope_theta": cs.Float(gt=0),
    "rope_scaling": cs.Choice(*_CHOICES["rope_scaling"]),
    "rope_factor": cs.Float(gt=0),
    "rope_low_freq_factor": cs.Float(gt=0),
    "rope_high_freq_factor": cs.Float(gt=0),
    "rope_original_max_len": cs.Int(min=1),
    "norm": cs.Choice(*_CHOICES["norm"]),
    "norm_eps": cs.Float(gt=0),
    "mlp": cs.Choice(*_CHOICES["mlp"]),
    "tie_embeddings": cs.Bool(),
    "qkv_bias": cs.Bool(),
    "qk_norm": cs.Bool(),
    "use_bias": cs.Bool(),
    "embed_scale": cs.Bool(),
    "zero_centered_norm": cs.Bool(),
    "post_norms": cs.Bool(),
    "query_pre_attn_scalar": cs.Float(min=0),
    "attn_logit_softcap": cs.Float(min=0),
    "final_logit_softcap": cs.Float(min=0),
    "sliding_window": cs.Int(min=0),
    "sliding_window_pattern": cs.Int(min=0),
    "rope_local_theta": cs.Float(min=0),
    "init_std": cs.Float(gt=0),
    "dtype": cs.Choice(*_CHOICES["dtype"]),
    "param_dtype": cs.Choice(*_CHOICES["param_dtype"]),
    "remat": cs.Choice(*_CHOICES["remat"]),
    "scan_layers": cs.Bool(),
    "attention_impl": cs.Choice(*_CHOICES["attention_impl"]),
    "lora_rank": cs.Int(min=0),
    "lora_alpha": cs.Float(gt=0),
    "lora_dropout": cs.Float(min=0, max=0.99),
    "lora_targets": cs.Str(nonempty=True),
  },
  checks=(_check_model,),
  required=False,
)
