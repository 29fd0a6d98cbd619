"""Decoder-only transformer in Flax Linen, with policy, value and reward heads.

Einsum axis legend:
  B batch, T query length, S key length (KV-cache slots), D d_model,
  N query heads, K kv heads, G = N // K query heads per kv head, H head dim,
  F mlp hidden, V vocabulary, L layers.

Every call takes explicit `positions` [B, T] and a boolean `attn_mask`
[B, T, S] (query t may attend key s), so left-padded prompts, packed sequences
and cached decoding all go through the same code. The KV cache is a plain
pytree passed in and returned (`init_cache`): {"k", "v"} of [L, B, S, K, H] with
scanned layers, a tuple of per-layer {"k", "v"} of [B, S, K, H] with unrolled ones;
the `cache_index` says at which slot the T new keys are written.

Parameters carry logical axis names (see rlhf_jax/sharding.py); so do key
activations, through `sharding.constrain`. Norms, softmax and logits run in
float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.sharding import constrain, logical_to_spec

Cache = dict[str, jax.Array] | tuple[dict[str, jax.Array], ...]  # stacked, or one dict a layer

# A large finite negative: a fully masked row (a left-pad query) then gets a
# uniform softmax instead of NaN; its output is never used.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# The window of a global layer among local ones (a per-layer window is a scanned int32).
_NO_WINDOW = int(np.iinfo(np.int32).max)


def _param(module: nn.Module, name: str, init, shape, names, dtype):
  return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position ids that skip padding: [B, T] bool -> [B, T] int32 (pads get 0)."""
  mask = mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask


def causal_attention_mask(mask: jax.Array) -> jax.Array:
  """Causal mask over valid tokens: [B, T] bool -> [B, T, T] bool."""
  t = mask.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
  return causal[None] & mask[:, None, :].astype(jnp.bool_)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Positions that restart at 0 for each packed example: [B, T] int -> [B, T] int32.

  `segment_ids` numbers the examples packed into a row (1, 2, ...; each one contiguous)
  and marks padding with 0, which gets position 0. An example then sees the positions it
  would see alone in a row, so packing changes neither RoPE nor learned positions.
  """
  segment_ids = segment_ids.astype(jnp.int32)
  t = segment_ids.shape[-1]
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
  first = jnp.ones_like(segment_ids[:, :1], jnp.bool_)
  starts = jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  # The index of each token's segment start: the running maximum of the start indices.
  start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  return jnp.where(segment_ids != 0, index - start_index, 0)


def segment_attention_mask(segment_ids: jax.Array) -> jax.Array:
  """Causal mask within each packed example: [B, T] int -> [B, T, T] bool.

  Query t attends key s when s <= t and both belong to the same example; padding
  (segment 0) attends to nothing and nothing attends to it (a fully masked row gets a
  uniform softmax, see `_MASK_VALUE`, and its output is never used). With one example
  per row (`segment_ids = mask`) it equals `causal_attention_mask` on every real query.
  """
  t = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return causal[None] & same & (segment_ids[:, None, :] != 0)


def init_cache(config: ModelConfig, batch_size: int, num_slots: int) -> Cache:
  """An empty KV cache in the compute dtype: with `scan_layers`, {"k", "v"} of [L, B, S, K,
  H]; with unrolled layers, a tuple of L such dicts of [B, S, K, H], one a layer, so that a
  decoding step updates each layer's buffer in place (slicing a stacked cache and stacking
  it again copies the whole cache every step: ~20% of a small model's decoding on CPU)."""
  shape = (batch_size, num_slots, config.kv_heads, config.head_size)
  if config.scan_layers:
    zeros = jnp.zeros((config.num_layers, *shape), jnp.dtype(config.dtype))
    return {"k": zeros, "v": zeros}
  zeros = jnp.zeros(shape, jnp.dtype(config.dtype))
  return tuple({"k": zeros, "v": zeros} for _ in range(config.num_layers))


CACHE_AXES = ("cache_layers", "cache_batch", "cache_len", "cache_kv_heads", "cache_head_dim")


def _constrain_cache(cache):
  """The cache's logical sharding, stacked ({"k", "v"} [L, ...]) or one dict a layer."""
  if isinstance(cache, dict):
    return {name: constrain(c, CACHE_AXES) for name, c in cache.items()}
  return tuple({name: constrain(c, CACHE_AXES[1:]) for name, c in d.items()} for d in cache)


class Norm(nn.Module):
  """LayerNorm or RMSNorm, computed in float32 (RMSNorm by 1 + scale with zero_centered_norm)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    pdt = jnp.dtype(cfg.param_dtype)
    d = x.shape[-1]
    xf = x.astype(jnp.float32)
    if cfg.norm == "layernorm":
      xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(var + cfg.norm_eps)
    if cfg.zero_centered_norm:
      scale = _param(self, "scale", nn.initializers.zeros, (d,), ("norm",), pdt)
      y = y * (1.0 + scale.astype(jnp.float32))
    else:
      y = y * _param(self, "scale", nn.initializers.ones, (d,), ("norm",), pdt).astype(jnp.float32)
    if cfg.norm == "layernorm":
      y = y + _param(self, "bias", nn.initializers.zeros, (d,), ("norm",), pdt).astype(jnp.float32)
    return y.astype(jnp.dtype(cfg.dtype))


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """RoPE's inverse frequencies [H/2] (float32), with the config's frequency scaling.

  Base: theta^(-2i/H). "linear" divides all by rope_factor; "llama3" divides those whose
  wavelength exceeds rope_original_max_len / rope_low_freq_factor, keeps those under
  rope_original_max_len / rope_high_freq_factor, and interpolates in between (the rule of
  Llama 3.1's `rope_scaling`).
  """
  h = cfg.head_size
  inv_freq = cfg.rope_theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  if cfg.rope_scaling == "linear":
    return inv_freq / cfg.rope_factor
  if cfg.rope_scaling == "llama3":
    old_len, factor = cfg.rope_original_max_len, cfg.rope_factor
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)
  return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, half-split layout (as in Llama/Gemma checkpoints).

  Args:
    x: [B, T, N, H].
    positions: [B, T] int.
    inv_freq: [H/2] float32 (`rope_inv_freq`).
  """
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
  # [x1 cos - x2 sin, x2 cos + x1 sin] as x * [cos, cos] + [x2, x1] * [-sin, sin]: the same
  # products and sums, but one swap of x's halves instead of a concatenation of two
  # computed halves, which XLA:CPU fuses about 5x slower (fwd + bwd).
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  swapped = jnp.concatenate([x2, x1], axis=-1)
  out = xf * jnp.concatenate([cos, cos], -1) + swapped * jnp.concatenate([-sin, sin], -1)
  return out.astype(x.dtype)


def _rms(x: jax.Array, scale: jax.Array, eps: float, dtype, zero_centered: bool) -> jax.Array:
  """RMSNorm over the last axis in float32, scaled by `scale` (1 + `scale` when
  `zero_centered`), cast to `dtype`."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  scale = scale.astype(jnp.float32)
  return (y * (1.0 + scale if zero_centered else scale)).astype(dtype)


def _local_rope(cfg: ModelConfig) -> ModelConfig:
  """The RoPE settings of the local layers when rope_local_theta is set (no scaling)."""
  return cfg.replace(rope_theta=cfg.rope_local_theta, rope_scaling="none")


def layer_inputs(cfg: ModelConfig) -> dict[str, jax.Array] | None:
  """Per-layer attention settings when local and global layers alternate (Gemma 2/3),
  scanned alongside the layers' parameters; None when all layers are alike.

  "window": [L] int32, the sliding window (`_NO_WINDOW` on global layers); "inv_freq":
  [L, H/2] float32 with rope_local_theta, each layer's RoPE inverse frequencies.
  """
  local = cfg.local_layers()
  if all(local) or not any(local):
    return None
  windows = [cfg.sliding_window if is_local else _NO_WINDOW for is_local in local]
  out = {"window": jnp.asarray(windows, jnp.int32)}
  if cfg.rope_local_theta and cfg.position == "rope":
    glob, loc = rope_inv_freq(cfg), rope_inv_freq(_local_rope(cfg))
    out["inv_freq"] = jnp.stack([loc if is_local else glob for is_local in local])
  return out


def _attention_settings(cfg: ModelConfig, layer):
  """(window or None, RoPE inverse frequencies or None) of a layer; `layer`: its slice of
  `layer_inputs`, or None when every layer is alike."""
  if layer is not None:
    window, inv_freq = layer["window"], layer.get("inv_freq")
  else:
    local = cfg.sliding_window > 0 and all(cfg.local_layers())
    window, inv_freq = (cfg.sliding_window if local else None), None
    if local and cfg.rope_local_theta and cfg.position == "rope":
      inv_freq = rope_inv_freq(_local_rope(cfg))
  if inv_freq is None and cfg.position == "rope":
    inv_freq = rope_inv_freq(cfg)
  return window, inv_freq


def project(x: jax.Array, w: jax.Array, n_in: int = 1, **dot_kwargs) -> jax.Array:
  """x [..., I1..In] contracted with w [I1..In, O1..Om] -> [..., O1..Om], as one 2-D matmul.

  The same product as the einsum ("BTD,DNH->BTNH"), with the leading axes and each side's
  axes flattened: XLA:CPU differentiates the 2-D form about 1.8x faster (the einsum's
  weight gradient contracts over batch and length at once, which it lays out with large
  transposing copies; benchmarks/peers measures it), and elsewhere the reshapes are free.
  `dot_kwargs` go to `jnp.dot` (preferred_element_type).
  """
  lead, ins, outs = x.shape[: x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
  rows = x.reshape(-1, math.prod(ins))
  y = jnp.dot(rows, w.reshape(math.prod(ins), math.prod(outs)), **dot_kwargs)
  return y.reshape(*lead, *outs)


def _adapt(module, name, x, weight, y, in_names, out_names):
  """`y` (the projection `name` of `x` by `weight`) plus its LoRA adapter's output, if the
  config adapts `name` (`lora.delta`)."""
  from rlhf_jax.models import lora  # imported late: lora imports the config checks

  delta = lora.delta(module, name, x, weight, in_names, out_names)
  return y if delta is None else y + delta.astype(y.dtype)


_Q_AXES = ("act_batch", "act_len", "act_heads", "act_head_dim")
_KV_AXES = ("act_batch", "act_len", "act_kv_heads", "act_head_dim")


@functools.cache
def _cuda_capability() -> tuple[int, ...] | None:
  """The default device's CUDA compute capability, or None off CUDA GPUs (CPU, TPU, ROCm),
  where cuDNN's kernels do not exist."""
  device = jax.devices()[0]
  if device.platform != "gpu" or "cuda" not in device.client.platform_version.lower():
    return None
  return tuple(int(part) for part in device.compute_capability.split("."))


def _cudnn_takes(cfg: ModelConfig, q: jax.Array, key: jax.Array) -> bool:
  """Whether cuDNN's flash attention runs this layer's q [B, T, N, H], key [B, S, K, H].

  These are the kernel's own conditions in JAX, checked here because JAX checks some only
  when it differentiates or partitions the program (under remat, or at compile time), too
  late to choose another kernel: a CUDA GPU; 16-bit inputs; head_dim a multiple of 8, at
  most 128 (256 from Hopper on); even T and S (our mask reaches cuDNN as an additive bias,
  whose backward needs them, so one-token decoding steps never qualify); and q, k, v split
  alike over the mesh (its partitioner splits batch and heads only, all three the same
  way: with fewer kv heads than the tensor axis, k and v stay whole while q is split).
  """
  capability = _cuda_capability()
  if capability is None or cfg.dtype not in ("bfloat16", "float16"):
    return False
  h = cfg.head_size
  if h % 8 or h > (256 if capability >= (9, 0) else 128):
    return False
  if q.shape[1] % 2 or key.shape[1] % 2:
    return False
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return True
  q_spec = logical_to_spec(_Q_AXES, q.shape, mesh)
  return q_spec == logical_to_spec(_KV_AXES, key.shape, mesh)


def attention_kernel(cfg: ModelConfig, q: jax.Array, key: jax.Array) -> str:
  """The kernel a layer runs: "xla" (the einsum path), "cudnn" (flash attention through
  jax.nn.dot_product_attention) or "jax" (jax.nn.dot_product_attention, JAX's choice of
  implementation: XLA in JAX 0.10, whose implementation=None never picks cuDNN).

  Chosen at trace time from `cfg.attention_impl` and the shapes: "auto" falls back to the
  einsums wherever cuDNN does not take the case (see `_cudnn_takes`) or the logits are
  soft-capped, so the default program is unchanged off GPU; "fused" always goes through
  jax.nn.dot_product_attention (ModelConfig refuses it with a soft-cap).
  """
  if cfg.attention_impl == "xla" or cfg.attn_logit_softcap:
    return "xla"
  if _cudnn_takes(cfg, q, key):
    return "cudnn"
  return "jax" if cfg.attention_impl == "fused" else "xla"


def _fused_attention(q, key, val, attn_mask, scale: float, kernel: str) -> jax.Array:
  """jax.nn.dot_product_attention: q [B, T, N, H], key/val [B, S, K, H] (grouped-query
  heads as they are), attn_mask [B, T, S] bool -> [B, T, N, H] in q's dtype.

  Masked logits get a large finite negative in both implementations, never -inf, so a fully
  masked row (a left-pad query) gets a finite output: XLA's is `_MASK_VALUE` exactly (a
  uniform softmax, as the einsum path's, which in a full pass is over its query block's
  keys: `causal_blocks`), cuDNN's a bias of -2**41. Such a row's output is never read.
  """
  return jax.nn.dot_product_attention(
    q,
    key.astype(q.dtype),  # a cache kept in another dtype; the kernel wants one dtype
    val.astype(q.dtype),
    bias=None,
    mask=attn_mask[:, None, :, :].astype(jnp.bool_),  # [B, 1, T, S]: the same for every head
    scale=scale,
    is_causal=False,  # causality, padding, packing and windows are all in the mask
    implementation="cudnn" if kernel == "cudnn" else None,
  )


def causal_blocks(t: int) -> list[tuple[int, int]]:
  """The query blocks [start, end) a full pass of length `t` computes attention in.

  Every mask this model is given is causal (a query never sees a later slot: causal,
  packed-segment and shared-prompt masks alike), so a block of queries needs the keys up
  to its end only, and the scores after it, about half of the T x T, are never computed.
  On 2 CPU cores, attention's forward and backward over 4 layers (B x T = 2048-4096
  tokens, 4 heads of 64): T 64 83 -> 68 ms with blocks of 32, T 96 85 -> 68, T 128
  152 -> 135 with blocks of 64, T 256 303 -> 184. Short rows stay one block; at most 8
  blocks, so long rows do not multiply the program's size.
  """
  if t < 64:
    return [(0, t)]
  size = 32 if t < 128 else max(64, -(-t // 8))
  return [(start, min(start + size, t)) for start in range(0, t, size)]


def _windowed(attn_mask: jax.Array, window, cache_index, t: int) -> jax.Array:
  """`attn_mask` [B, T, S] restricted to the sliding window (None: unchanged).

  Query slot i (cache_index + t) sees key slots i - window + 1 .. i, as transformers'
  sliding window. A row's tokens fill contiguous slots (left-padded prompts, packed
  segments), so slot distances are position distances. (jax.nn.dot_product_attention's
  own local_window_size counts from slot 0 and so misses the cache offset.)
  """
  if window is None:
    return attn_mask
  start = 0 if cache_index is None else cache_index
  query_slot = start + jnp.arange(t)[:, None]
  near = jnp.arange(attn_mask.shape[-1])[None, :] > query_slot - window  # [T, S]
  return attn_mask & near[None]


class Attention(nn.Module):
  """Grouped-query attention with an optional KV cache, through einsums or a fused kernel
  (`attention_kernel`)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, attn_mask, cache=None, cache_index=None, layer=None):
    """x: [B, T, D]; attn_mask: [B, T, S]; cache: {"k","v"} [B, S, K, H] or None; layer:
    this layer's slice of `layer_inputs` or None."""
    cfg = self.config
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
    init = nn.initializers.normal(cfg.init_std)
    # GPT-2: residual projections scaled down by depth.
    out_init = nn.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
    wq = _param(self, "q", init, (d, n, h), ("embed", "heads", "head_dim"), pdt)
    wk = _param(self, "k", init, (d, k, h), ("embed", "kv_heads", "head_dim"), pdt)
    wv = _param(self, "v", init, (d, k, h), ("embed", "kv_heads", "head_dim"), pdt)
    wo = _param(self, "o", out_init, (n, h, d), ("heads", "head_dim", "embed"), pdt)

    q = project(x, wq.astype(dt))
    key = project(x, wk.astype(dt))
    val = project(x, wv.astype(dt))
    if cfg.lora_rank:  # low-rank adapters (models/lora.py), x A B added to each projection
      q = _adapt(self, "q", x, wq, q, ("embed",), ("heads", "head_dim"))
      key = _adapt(self, "k", x, wk, key, ("embed",), ("kv_heads", "head_dim"))
      val = _adapt(self, "v", x, wv, val, ("embed",), ("kv_heads", "head_dim"))
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q = q + _param(self, "q_bias", zeros, (n, h), ("heads", "head_dim"), pdt).astype(dt)
      key = key + _param(self, "k_bias", zeros, (k, h), ("kv_heads", "head_dim"), pdt).astype(dt)
      val = val + _param(self, "v_bias", zeros, (k, h), ("kv_heads", "head_dim"), pdt).astype(dt)
    if cfg.qk_norm:  # per head, over head_dim, in float32 (as Norm)
      zc = cfg.zero_centered_norm
      one = nn.initializers.zeros if zc else nn.initializers.ones
      q = _rms(q, _param(self, "q_norm", one, (h,), ("norm",), pdt), cfg.norm_eps, dt, zc)
      key = _rms(key, _param(self, "k_norm", one, (h,), ("norm",), pdt), cfg.norm_eps, dt, zc)
    window, inv_freq = _attention_settings(cfg, layer)
    if cfg.position == "rope":
      q = apply_rope(q, positions, inv_freq)
      key = apply_rope(key, positions, inv_freq)
    q = constrain(q, ("act_batch", "act_len", "act_heads", "act_head_dim"))
    key = constrain(key, ("act_batch", "act_len", "act_kv_heads", "act_head_dim"))
    val = constrain(val, ("act_batch", "act_len", "act_kv_heads", "act_head_dim"))

    new_cache = None
    if cache is not None:
      # Write the T new keys/values at slot cache_index; attend over all S slots.
      at = (0, cache_index, 0, 0)
      key = jax.lax.dynamic_update_slice(cache["k"], key.astype(cache["k"].dtype), at)
      val = jax.lax.dynamic_update_slice(cache["v"], val.astype(cache["v"].dtype), at)
      new_cache = {"k": key, "v": val}

    b, t = q.shape[:2]
    scale = (cfg.query_pre_attn_scalar or h) ** -0.5
    kernel = attention_kernel(cfg, q, key)
    if kernel != "xla":
      out = _fused_attention(
        q, key, val, _windowed(attn_mask, window, cache_index, t), scale, kernel
      )
    else:
      q = q.reshape(b, t, k, n // k, h)  # query head n uses kv head n // G
      attn_mask = _windowed(attn_mask, window, cache_index, t)
      outs = []
      for start, end in [(0, t)] if cache is not None else causal_blocks(t):
        # A full pass's query block [start, end) sees keys [0, end) only: the mask is
        # causal, so the keys after the block are masked for every query in it.
        keys = key.shape[1] if cache is not None else end
        logits = jnp.einsum(
          "BTKGH,BSKH->BKGTS",
          q[:, start:end],
          key[:, :keys],
          preferred_element_type=jnp.float32,
        )
        logits = logits * scale
        if cfg.attn_logit_softcap:
          logits = jnp.tanh(logits / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
        block_mask = attn_mask[:, None, None, start:end, :keys]
        logits = jnp.where(block_mask, logits, _MASK_VALUE)
        probs = jax.nn.softmax(logits, axis=-1).astype(dt)
        outs.append(jnp.einsum("BKGTS,BSKH->BTKGH", probs, val[:, :keys]))
      out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
      out = out.reshape(b, t, n, h)
    heads_out = out
    out = project(out, wo.astype(dt), 2)
    if cfg.lora_rank:
      out = _adapt(self, "o", heads_out, wo, out, ("heads", "head_dim"), ("embed",))
    if cfg.use_bias:
      out = out + _param(self, "o_bias", nn.initializers.zeros, (d,), ("embed",), pdt).astype(dt)
    return out, new_cache


class Mlp(nn.Module):
  """GELU MLP (GPT-2) or gated SwiGLU / GeGLU (Llama, Gemma)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, f = cfg.d_model, cfg.mlp_dim
    init = nn.initializers.normal(cfg.init_std)
    out_init = nn.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
    zeros = nn.initializers.zeros
    w_up = _param(self, "up", init, (d, f), ("embed", "mlp"), pdt)
    up = project(x, w_up.astype(dt))
    if cfg.lora_rank:
      up = _adapt(self, "up", x, w_up, up, ("embed",), ("mlp",))
    if cfg.use_bias:
      up = up + _param(self, "up_bias", zeros, (f,), ("mlp",), pdt).astype(dt)
    if cfg.mlp == "gelu":
      hidden = nn.gelu(up, approximate=True)
    else:
      w_gate = _param(self, "gate", init, (d, f), ("embed", "mlp"), pdt)
      gate = project(x, w_gate.astype(dt))
      if cfg.lora_rank:
        gate = _adapt(self, "gate", x, w_gate, gate, ("embed",), ("mlp",))
      if cfg.use_bias:
        gate = gate + _param(self, "gate_bias", zeros, (f,), ("mlp",), pdt).astype(dt)
      act = nn.silu if cfg.mlp == "swiglu" else lambda z: nn.gelu(z, approximate=True)
      hidden = act(gate) * up
    hidden = constrain(hidden, ("act_batch", "act_len", "act_mlp"))
    w_down = _param(self, "down", out_init, (f, d), ("mlp", "embed"), pdt)
    out = project(hidden, w_down.astype(dt))
    if cfg.lora_rank:
      out = _adapt(self, "down", hidden, w_down, out, ("mlp",), ("embed",))
    if cfg.use_bias:
      out = out + _param(self, "down_bias", zeros, (d,), ("embed",), pdt).astype(dt)
    return out


class Block(nn.Module):
  """Pre-norm transformer block (with post_norms, also norms on the branch outputs).
  Signature fits nn.scan: (x, cache) -> (x, cache)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, cache, positions, attn_mask, cache_index, layer=None):
    cfg = self.config
    attn_out, cache = Attention(cfg, name="attn")(
      Norm(cfg, name="attn_norm")(x), positions, attn_mask, cache, cache_index, layer
    )
    if cfg.post_norms:
      attn_out = Norm(cfg, name="attn_post_norm")(attn_out)
    x = x + attn_out
    mlp_out = Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x))
    if cfg.post_norms:
      mlp_out = Norm(cfg, name="mlp_post_norm")(mlp_out)
    x = x + mlp_out
    x = constrain(x, ("act_batch", "act_len", "act_embed"))
    return x, cache


def _remat_policy(name: str):
  if name == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return jax.checkpoint_policies.nothing_saveable


class Transformer(nn.Module):
  """The trunk: embeddings, blocks, final norm. Heads are separate modules."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    pdt = jnp.dtype(cfg.param_dtype)
    self.embedding = self.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
      (cfg.vocab_size, cfg.d_model),
      pdt,
    )
    if cfg.position == "learned":
      self.pos_embedding = self.param(
        "pos_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
        (cfg.max_len, cfg.d_model),
        pdt,
      )
    block = Block
    if cfg.remat != "none":
      block = nn.remat(block, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.layers = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},  # LoRA dropout: its own masks per layer
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, 0),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, name="layers")
    else:
      self.layers = [block(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
    self.final_norm = Norm(cfg)

  def __call__(self, tokens, positions, attn_mask, cache=None, cache_index=None):
    """tokens, positions: [B, T]; attn_mask: [B, T, S] -> ([B, T, D], new cache)."""
    cfg = self.config
    dt = jnp.dtype(cfg.dtype)
    x = jnp.take(self.embedding, tokens, axis=0).astype(dt)
    if cfg.embed_scale:
      x = x * jnp.asarray(cfg.d_model**0.5, dt)
    if cfg.position == "learned":
      x = x + jnp.take(self.pos_embedding, positions, axis=0).astype(dt)
    x = constrain(x, ("act_batch", "act_len", "act_embed"))
    if cache is not None:
      cache = _constrain_cache(cache)
    per_layer = layer_inputs(cfg)
    if cfg.scan_layers:
      if not isinstance(cache, dict | None):
        raise ValueError("scanned layers take a stacked cache: init_cache with scan_layers")
      x, cache = self.layers(x, cache, positions, attn_mask, cache_index, per_layer)
    else:
      stacked = isinstance(cache, dict)
      new = []
      for i, layer in enumerate(self.layers):
        if cache is None:
          layer_cache = None
        else:
          layer_cache = jax.tree.map(lambda c: c[i], cache) if stacked else cache[i]
        settings = None if per_layer is None else jax.tree.map(lambda a: a[i], per_layer)
        x, layer_cache = layer(x, layer_cache, positions, attn_mask, cache_index, settings)
        new.append(layer_cache)
      if cache is not None:
        cache = jax.tree.map(lambda *c: jnp.stack(c), *new) if stacked else tuple(new)
    if cache is not None:
      cache = _constrain_cache(cache)
    return self.final_norm(x), cache

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output embedding: [B, T, D] -> [B, T, V] float32."""
    dt = jnp.dtype(self.config.dtype)
    return project(x, self.embedding.astype(dt).T, preferred_element_type=jnp.float32)


def _default_inputs(tokens, positions, attn_mask):
  if attn_mask is None:
    attn_mask = causal_attention_mask(jnp.ones(tokens.shape, jnp.bool_))
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return positions, attn_mask


class LanguageModel(nn.Module):
  """The policy network: trunk + LM head (tied or untied) -> float32 logits.

  With `value_head=True` it also returns a scalar value per token from a
  zero-initialised head on the shared trunk (PPO's shared-trunk option).
  """

  config: ModelConfig
  value_head: bool = False

  def setup(self):
    cfg = self.config
    self.trunk = Transformer(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = self.param(
        "lm_head",
        nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
        (cfg.d_model, cfg.vocab_size),
        jnp.dtype(cfg.param_dtype),
      )
    if self.value_head:
      self.value = ScalarHead(cfg, init="zeros")

  def __call__(
    self,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    attn_mask: jax.Array | None = None,
    cache: Cache | None = None,
    cache_index: jax.Array | int | None = None,
    last_only: bool = False,
    logits_window: tuple[int, int] | None = None,
    logits_at: jax.Array | None = None,
  ) -> tuple[jax.Array, Any]:
    """Returns (logits [B, T, V] float32, new cache), plus values [B, T] with a value head.

    Args:
      tokens: [B, T] int32.
      positions: [B, T] int32 position ids (default 0..T-1).
      attn_mask: [B, T, S] bool (default causal over T, S = T).
      cache: KV cache from `init_cache`, or None for a plain forward pass.
      cache_index: slot at which the T new tokens are written into the cache.
      last_only: compute logits for the last position only ([B, 1, V]); used
        by the sampler's prefill, whose prompts are left-padded.
      logits_window: (start, stop), static: logits for those positions only
        ([B, stop - start, V]), e.g. the ones that predict a response. The LM head
        and its gradient then skip the others (with a large vocabulary, the head is
        a large share of a step, and [B, T, V] float32 logits of its memory). Values
        (with a value head) stay [B, T].
      logits_at: [B, K] int positions: logits there only ([B, K, V]), a window per row
        in any order (DPO's shared-prompt rows: the positions that predict a target);
        counted within `logits_window` when both are given.
    """
    positions, attn_mask = _default_inputs(tokens, positions, attn_mask)
    hidden, cache = self.trunk(tokens, positions, attn_mask, cache, cache_index)
    if last_only:
      logits_window = (hidden.shape[1] - 1, hidden.shape[1])
    head_in = hidden if logits_window is None else hidden[:, slice(*logits_window)]
    if logits_at is not None:  # rows of the flattened [B * T, D]: one plain gather
      b, t, d = head_in.shape
      rows = jnp.arange(b, dtype=jnp.int32)[:, None] * t + logits_at.astype(jnp.int32)
      head_in = jnp.take(head_in.reshape(b * t, d), rows.reshape(-1), axis=0)
      head_in = head_in.reshape(*logits_at.shape, d)
    if self.config.tie_embeddings:
      logits = self.trunk.attend(head_in)
    else:
      dt = jnp.dtype(self.config.dtype)
      logits = project(head_in, self.lm_head.astype(dt), preferred_element_type=jnp.float32)
    if self.config.final_logit_softcap:
      cap = self.config.final_logit_softcap
      logits = jnp.tanh(logits / cap) * cap
    logits = constrain(logits, ("act_batch", "act_len", "act_vocab"))
    if self.value_head:
      return logits, cache, self.value(hidden)
    return logits, cache


class ScalarHead(nn.Module):
  """d_model -> 1 projection read out per token, in float32."""

  config: ModelConfig
  init: str = "reward"  # "reward": N(0, 1/sqrt(D+1)); "zeros"; "normal": N(0, init_std)

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    d = self.config.d_model
    if self.init == "reward":
      # docs/rlhf_details.md: head weights ~ N(0, 1/sqrt(d_model + 1)), bias 0.
      kernel_init = nn.initializers.normal(1.0 / (d + 1) ** 0.5)
    elif self.init == "zeros":
      kernel_init = nn.initializers.zeros
    elif self.init == "normal":
      kernel_init = nn.initializers.normal(self.config.init_std)
    else:
      raise ValueError(f"ScalarHead.init={self.init!r}; expected reward, zeros or normal.")
    kernel = self.param(
      "kernel", nn.with_logical_partitioning(kernel_init, ("embed",)), (d,), jnp.float32
    )
    bias = self.param(
      "bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (), jnp.float32
    )
    return jnp.einsum("BTD,D->BT", hidden.astype(jnp.float32), kernel) + bias


class ScalarModel(nn.Module):
  """Trunk + scalar head: the reward model and the separate value network.

  The parameter layout, {"trunk", "head"}, is the same for both, so a value
  network can be initialised from a trained reward model, and the trunk from
  a policy.
  """

  config: ModelConfig
  head_init: str = "reward"

  def setup(self):
    self.trunk = Transformer(self.config)
    self.head = ScalarHead(self.config, init=self.head_init)

  def __call__(self, tokens, positions=None, attn_mask=None) -> jax.Array:
    """tokens [B, T] -> per-token scalars [B, T] float32."""
    positions, attn_mask = _default_inputs(tokens, positions, attn_mask)
    hidden, _ = self.trunk(tokens, positions, attn_mask)
    return self.head(hidden)


def reward_model(config: ModelConfig) -> ScalarModel:
  return ScalarModel(config, head_init="reward")


def value_model(config: ModelConfig) -> ScalarModel:
  return ScalarModel(config, head_init="zeros")


# Parameters that end a block's residual branches: zeroing them makes the block the identity.
_BRANCH_OUTPUTS = frozenset({"o", "o_bias", "down", "down_bias"})


def grow_trunk(fresh: Any, base: Any, num_base_layers: int, scan_layers: bool) -> Any:
  """A deeper trunk whose first layers (and embeddings, final norm) come from `base`.

  `fresh` holds the plain (unboxed) parameters of a trunk with more layers, `base`
  those of a trained trunk with `num_base_layers` of them. The layers on top keep
  their fresh initialisation, except the projections that end their residual
  branches (attention "o", MLP "down", and their biases), which are zeroed: each new
  block starts as the identity, so the grown trunk computes exactly what `base`
  computes until training moves it. A reward model grows its trunk this way to get
  layers that sit above the policy's top layer, where the next-token predictions of
  every position are visible to the positions after it.
  """

  def zero_branch_ends(layer):
    return jax.tree.map_with_path(
      lambda path, x: jnp.zeros_like(x) if path[-1].key in _BRANCH_OUTPUTS else x, layer
    )

  out = dict(base)  # embeddings, final norm and the base layers
  if scan_layers:  # leaves [num_layers, ...]: the base rows, then the fresh ones
    top = zero_branch_ends(jax.tree.map(lambda x: x[num_base_layers:], fresh["layers"]))
    out["layers"] = jax.tree.map(
      lambda old, new: jnp.concatenate([old, new.astype(old.dtype)]), base["layers"], top
    )
  else:
    num_layers = sum(key.startswith("layer_") for key in fresh)
    for i in range(num_base_layers, num_layers):
      out[f"layer_{i}"] = zero_branch_ends(fresh[f"layer_{i}"])
  return out


def init_params(module: nn.Module, rng: jax.Array, seq_len: int = 8) -> Any:
  """Boxed (logically partitioned) parameters of `module` for a [1, seq_len] input.

  Pass through `rlhf_jax.sharding.init_sharded` to create them sharded, or
  through `flax.core.meta.unbox` for plain arrays.
  """
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return module.init(rng, tokens)["params"]
