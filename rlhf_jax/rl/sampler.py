"""Jitted generation with a KV cache: prefill, then a decode loop inside jit.

Shapes are static: prompts are left-padded to a fixed length P, exactly
`max_new_tokens` (N) tokens are generated into a cache of P + N slots, and
truncation at the first EOS is applied as a mask. The loop is a
`lax.while_loop` that also stops once every sequence has emitted EOS.

Returned log-probs are those of the temperature-scaled distribution,
log softmax(logits / T), which is what the training path recomputes
(`rl.logprobs.token_logprobs` at the same T). When top-k / top-p truncate the
distribution, `sample_logprobs` holds the log-probs under the truncated,
renormalised distribution the tokens were actually drawn from.

Left padding works because positions come from the prompt mask (pads do not
advance the position) and pad slots are masked out of attention.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax import sharding
from rlhf_jax.models import init_cache, positions_from_mask


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Generation settings; all static (part of the compiled program)."""

  max_new_tokens: int
  eos_id: int
  pad_id: int
  temperature: float = 1.0
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1.0: off
  greedy: bool = False
  # Ids at or past this are never drawn: embedding rows the tokenizer never produces (a
  # Hugging Face model's padded vocabulary, a pad id added past the pieces); 0: none.
  # PAD is never drawn either: a PAD inside a response would read as padding.
  num_valid: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplerConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}.")
    if self.pad_id == self.eos_id:
      raise ValueError(
        f"SamplerConfig.pad_id == eos_id == {self.eos_id}: EOS would be masked out as padding."
      )
    if not self.greedy and self.temperature <= 0:
      raise ValueError(
        f"SamplerConfig.temperature must be > 0 (got {self.temperature}); use greedy=True."
      )
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplerConfig.top_p must be in (0, 1], got {self.top_p}.")
    if self.top_k < 0:
      raise ValueError(f"SamplerConfig.top_k must be >= 0, got {self.top_k}.")


class SampleOutput(NamedTuple):
  """Result of `generate`. N = max_new_tokens.

  tokens:          [B, N] int32, PAD after the first EOS (EOS itself kept).
  logprobs:        [B, N] float32, log softmax(logits / T)[token] (T = 1 if
                   greedy); 0 where response_mask is False.
  sample_logprobs: [B, N] float32, under the top-k/top-p truncated distribution.
  response_mask:   [B, N] bool, True up to and including the first EOS.
  lengths:         [B] int32, number of response tokens (EOS included).
  has_eos:         [B] bool, whether the response ended with EOS.
  """

  tokens: jax.Array
  logprobs: jax.Array
  sample_logprobs: jax.Array
  response_mask: jax.Array
  lengths: jax.Array
  has_eos: jax.Array


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets logits outside the top-k / top-p (nucleus) set to -inf.

  Args:
    logits: [B, V] float32, already divided by the temperature.
    top_k: keep the k largest (0: all).
    top_p: keep the smallest set of tokens whose probability reaches top_p
      (the most likely token is always kept).
  """
  neg_inf = jnp.finfo(logits.dtype).min
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg_inf, logits)
  return logits


def ban_invalid(logits: jax.Array, config: SamplerConfig) -> jax.Array:
  """[..., V] logits with PAD and the ids past `config.num_valid` set to -inf."""
  ids = jnp.arange(logits.shape[-1])
  banned = ids == config.pad_id
  if config.num_valid:
    banned = banned | (ids >= config.num_valid)
  return jnp.where(banned, -jnp.inf, logits)


def _choose(logits: jax.Array, rng: jax.Array, config: SamplerConfig):
  """One sampling step: [B, V] float32 logits -> (token, logprob, sample_logprob) [B].

  The token never is PAD or an id past `num_valid` (`ban_invalid`); `logprob` is under
  the model's whole distribution (what training recomputes), `sample_logprob` under the
  one the token was drawn from.
  """
  if config.greedy:
    token = jnp.argmax(ban_invalid(logits, config), axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    return token, picked, picked
  scaled = logits / config.temperature
  filtered = filter_logits(ban_invalid(scaled, config), config.top_k, config.top_p)
  token = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
  logp = jax.nn.log_softmax(scaled, axis=-1)
  sample_logp = jax.nn.log_softmax(filtered, axis=-1)
  take = lambda x: jnp.take_along_axis(x, token[:, None], axis=-1)[:, 0]
  return token, take(logp), take(sample_logp)


def generate(
  model: Any,
  params: Any,
  prompt_tokens: jax.Array,
  prompt_mask: jax.Array,
  rng: jax.Array,
  config: SamplerConfig,
) -> SampleOutput:
  """Samples `config.max_new_tokens` tokens after left-padded prompts.

  Args:
    model: a `LanguageModel` (static).
    params: its parameters.
    prompt_tokens: [B, P] int32, left-padded (the last column is a real token).
    prompt_mask: [B, P] bool, True on real prompt tokens.
    rng: PRNG key (unused when greedy).
    config: static generation settings.

  Returns:
    A `SampleOutput`.
  """
  b, p = prompt_tokens.shape
  n = config.max_new_tokens
  s = p + n
  prompt_mask = prompt_mask.astype(jnp.bool_)
  apply = functools.partial(model.apply, {"params": params})

  # Prefill: the whole prompt in one pass, writing slots [0, P).
  cache = init_cache(model.config, b, s)
  key_mask = jnp.concatenate([prompt_mask, jnp.zeros((b, n), jnp.bool_)], axis=1)  # [B, S]
  causal = jnp.arange(s)[None, :] <= jnp.arange(p)[:, None]  # [P, S]
  attn_mask = causal[None] & key_mask[:, None, :]
  logits, cache = apply(
    prompt_tokens, positions_from_mask(prompt_mask), attn_mask, cache, 0, last_only=True
  )
  prompt_len = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)  # next position id

  state = dict(
    t=jnp.zeros((), jnp.int32),
    logits=logits[:, -1],
    cache=cache,
    key_mask=key_mask,
    done=jnp.zeros((b,), jnp.bool_),
    tokens=jnp.full((b, n), config.pad_id, jnp.int32),
    logprobs=jnp.zeros((b, n), jnp.float32),
    sample_logprobs=jnp.zeros((b, n), jnp.float32),
    mask=jnp.zeros((b, n), jnp.bool_),
  )

  def cond(st):
    return (st["t"] < n) & ~jnp.all(st["done"])

  def body(st):
    t = st["t"]
    token, logp, sample_logp = _choose(st["logits"], jax.random.fold_in(rng, t), config)
    alive = ~st["done"]
    token = jnp.where(alive, token, config.pad_id)
    write = lambda buf, col: jax.lax.dynamic_update_slice(buf, col[:, None], (0, t))
    zero = jnp.zeros_like(logp)
    slot = p + t
    key_mask = jax.lax.dynamic_update_slice(st["key_mask"], alive[:, None], (0, slot))
    row_mask = (jnp.arange(s)[None, :] <= slot) & key_mask  # [B, S]
    logits, cache = apply(
      token[:, None], (prompt_len + t)[:, None], row_mask[:, None, :], st["cache"], slot
    )
    return dict(
      t=t + 1,
      logits=logits[:, -1],
      cache=cache,
      key_mask=key_mask,
      done=st["done"] | (token == config.eos_id),
      tokens=write(st["tokens"], token),
      logprobs=write(st["logprobs"], jnp.where(alive, logp, zero)),
      sample_logprobs=write(st["sample_logprobs"], jnp.where(alive, sample_logp, zero)),
      mask=write(st["mask"], alive),
    )

  st = jax.lax.while_loop(cond, body, state)
  return SampleOutput(
    tokens=st["tokens"],
    logprobs=st["logprobs"],
    sample_logprobs=st["sample_logprobs"],
    response_mask=st["mask"],
    lengths=jnp.sum(st["mask"], axis=-1).astype(jnp.int32),
    has_eos=st["done"],
  )


def output_shardings(mesh) -> SampleOutput:
  """A `SampleOutput` of shardings: every field split by rows over the mesh's batch axes."""
  batch, vector = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
  return SampleOutput(batch, batch, batch, batch, vector, vector)


def make_sampler(
  model: Any,
  config: SamplerConfig,
  *,
  mesh=None,
  rules: str | sharding.Rules = "fsdp_tp",
  param_shardings: Any = None,
):
  """A jitted `fn(params, prompt_tokens, prompt_mask, rng) -> SampleOutput`.

  With a mesh, prompts and outputs are sharded over the batch axes, the
  parameters stay in `param_shardings`, and the KV cache follows the
  `cache_*` logical rules. Without one, it is a plain `jax.jit`.
  """
  fn = functools.partial(generate, model, config=config)
  if mesh is None:
    return jax.jit(fn)
  batch = sharding.batch_sharding(mesh, 2)
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  jitted = jax.jit(
    fn,
    in_shardings=(param_shardings, batch, batch, replicated),
    out_shardings=output_shardings(mesh),
  )

  def run(params, prompt_tokens, prompt_mask, rng):
    with sharding.use_mesh(mesh, rules):
      return jitted(params, prompt_tokens, prompt_mask, rng)

  return run
