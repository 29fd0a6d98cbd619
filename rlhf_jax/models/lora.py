"""Low-rank adapters (LoRA, Hu et al. 2021) on the attention and MLP projections.

A projection `y = x W` with a LoRA adapter computes `y = x W + (alpha / r) (dropout(x) A) B`,
with A [in..., r] drawn at random and B [r, out...] zero, so an adapted model starts as the
base model exactly. The adapters are ordinary parameters next to the weight they adapt
(`q` gets `q_lora_a` and `q_lora_b` in the same attention module), created when the model's
`ModelConfig.lora_rank` is positive, for the projections `lora_targets` names.

How the trainers use them:
- `attach` adds fresh adapters to a loaded (plain) policy's parameters;
- `TRAINABLE` is the regex of adapter paths: the optimizer freezes every other parameter
  (`optim.make_optimizer(..., trainable=TRAINABLE)`), so only adapters have gradients that
  reach the update, optimizer state and changes;
- `base` strips the adapters, and `plain(cfg)` is the config without them: together the
  base model, which is the frozen reference of PPO, GRPO and DPO (one copy of its weights);
- `merge` folds the adapters into the weights (W + alpha/r A B) and `plain` drops them from
  the config: a stage exports merged, so every later stage and the Hugging Face export see a
  plain model.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax import config_spec as cs
from rlhf_jax.models.transformer import project

TARGETS = ("q", "k", "v", "o", "up", "gate", "down")
# Leading axes of each projection's weight that the input contracts with; the rest are outputs.
_IN_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "up": 1, "gate": 1, "down": 1}
# The weight's rank without a stacked layer axis (nn.scan adds one in front).
_NDIM = {"q": 3, "k": 3, "v": 3, "o": 3, "up": 2, "gate": 2, "down": 2}
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
TRAINABLE = ".*_lora_[ab]"  # full-matched against '/'-joined parameter paths


class Targets(cs.Check):
  """A comma-separated subset of TARGETS."""

  def problem(self, value):
    return check_targets(value)


# The `lora` section of the trainers that take one (configs/common.py: lora_section).
CONFIG_SPEC = cs.Spec(
  {
    "rank": cs.Int(min=0),
    "alpha": cs.Float(gt=0),
    "dropout": cs.Float(min=0, max=0.99),
    "targets": Targets(),
  }
)


def needs_start(field: str):
  """A config check: adapters (`lora.rank` > 0) need a model to adapt in `field`."""

  def check(config, prefix: str) -> None:
    if config.lora.rank and not config.get(field):
      raise cs.ConfigError(
        f"{prefix}.lora.rank={config.lora.rank} trains low-rank adapters on a starting "
        f"model, but {prefix}.{field} is empty: set it to a finished stage or hf:DIR, or "
        "set lora.rank=0 to train every parameter."
      )

  return check


def check_no_dropout(config, prefix: str) -> None:
  """A config check for the trainers whose updates draw no dropout masks (PPO, GRPO)."""
  if config.lora.rank and config.lora.dropout:
    raise cs.ConfigError(
      f"{prefix}.lora.dropout={config.lora.dropout!r}: this trainer applies no dropout in "
      "its updates (PPO and GRPO compare log-probs of the same policy across passes); "
      "set it to 0."
    )


def with_adapters(cfg, section):
  """`cfg` with the adapters a `lora` config section asks for (none when rank is 0)."""
  return cfg.replace(
    lora_rank=int(section.rank),
    lora_alpha=float(section.alpha),
    lora_dropout=float(section.dropout),
    lora_targets=str(section.targets),
  )


def targets(cfg) -> tuple[str, ...]:
  """The projections `cfg` adapts (none when `lora_rank` is 0)."""
  if not cfg.lora_rank:
    return ()
  return tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())


def check_targets(value: str) -> str | None:
  """Why `lora_targets` is not a comma-separated subset of TARGETS, or None."""
  names = [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else None
  if not names:
    return f"must name projections among {', '.join(TARGETS)}, comma-separated"
  unknown = [t for t in names if t not in TARGETS]
  if unknown:
    return f"unknown projections {unknown}; choose among {', '.join(TARGETS)}"
  return None


def delta(module: nn.Module, name: str, x: jax.Array, weight: jax.Array, in_names, out_names):
  """The adapter's output `(alpha / r) (dropout(x) A) B` for projection `name` of `module`
  (whose weight is `weight`, with logical axes in_names + out_names), or None when `name`
  is not adapted. Dropout runs only when the module is applied with a "dropout" RNG."""
  cfg = module.config
  if name not in targets(cfg):
    return None
  r, n_in = cfg.lora_rank, len(in_names)
  in_shape, out_shape = weight.shape[:n_in], weight.shape[n_in:]
  pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
  # A ~ N(0, 1/fan_in): the adapter's hidden units have unit scale; B = 0: no change at start.
  a_init = nn.initializers.normal(1.0 / math.sqrt(math.prod(in_shape)))
  a = module.param(
    name + SUFFIX_A, nn.with_logical_partitioning(a_init, (*in_names, None)), (*in_shape, r), pdt
  )
  b = module.param(
    name + SUFFIX_B,
    nn.with_logical_partitioning(nn.initializers.zeros, (None, *out_names)),
    (r, *out_shape),
    pdt,
  )
  if cfg.lora_dropout and module.has_rng("dropout"):
    keep = 1.0 - cfg.lora_dropout
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
    x = jnp.where(mask, x / keep, 0).astype(x.dtype)
  hidden = project(x, a.astype(dt), n_in)
  return project(hidden, b.astype(dt)) * jnp.asarray(cfg.lora_alpha / r, dt)


def plain(cfg):
  """`cfg` without adapters."""
  return cfg.replace(lora_rank=0)


def trainable(cfg_or_rank, *also: str) -> str | None:
  """The regex of the parameters that train when the model has adapters (theirs, and `also`:
  e.g. a reward model's heads), or None when every parameter trains.

  `cfg_or_rank`: the model's config (its `lora_rank`) or the rank itself (`config.lora.rank`,
  before the model exists). The optimizer and the update's `stop_frozen` take it from here,
  so the two cannot disagree.
  """
  rank = getattr(cfg_or_rank, "lora_rank", cfg_or_rank)
  return "|".join((TRAINABLE, *also)) if rank else None


def stop_frozen(params: Any, pattern: str | None) -> Any:
  """`params` with a stop-gradient on every leaf `pattern` does not match (None: none).

  Applied inside a loss, it keeps the backward pass from computing the frozen weights'
  gradients (the matmuls that would give dW), so only the trainable parameters get
  gradients; the others come out as zeros, which the optimizer's frozen branch ignores.
  """
  if pattern is None:
    return params
  from rlhf_jax import optim  # imported late: optim's config checks import config_spec too

  keep = optim.trainable_mask(params, pattern)
  return jax.tree.map(lambda k, x: x if k else jax.lax.stop_gradient(x), keep, params)


def merged(params: Any, cfg) -> Any:
  """`merge(params, cfg)` when `cfg` has adapters, else `params` unchanged."""
  return merge(params, cfg) if cfg.lora_rank else params


def _walk(tree: Any, fn) -> Any:
  """Applies fn(dict) -> dict to every dict of the tree, bottom up."""
  if not isinstance(tree, dict):
    return tree
  return fn({k: _walk(v, fn) for k, v in tree.items()})


def is_adapter(name: str) -> bool:
  return name.endswith((SUFFIX_A, SUFFIX_B))


def base(params: Any) -> Any:
  """The parameters without their adapters (the base model's, shared, not copied)."""
  return _walk(params, lambda d: {k: v for k, v in d.items() if not is_adapter(k)})


def adapters(params: Any) -> Any:
  """Only the adapters (empty dicts pruned)."""

  def keep(d):
    out = {k: v for k, v in d.items() if is_adapter(k) or (isinstance(v, dict) and v)}
    return out

  return _walk(params, keep)


def merge(params: Any, cfg) -> Any:
  """Parameters with every adapter folded into its weight: W + (alpha / r) A B, in the
  weight's dtype (computed in float32), the adapters removed."""
  scale = cfg.lora_alpha / max(cfg.lora_rank, 1)

  def fold(d):
    out = {k: v for k, v in d.items() if not is_adapter(k)}
    for name in TARGETS:
      if name + SUFFIX_A not in d:
        continue
      w, a, b = d[name], d[name + SUFFIX_A], d[name + SUFFIX_B]

      def one(w, a, b):
        ab = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
        return (w.astype(jnp.float32) + scale * ab).astype(w.dtype)

      fold_one = one
      for _ in range(w.ndim - _NDIM[name]):  # stacked layers, ensemble members
        fold_one = jax.vmap(fold_one)
      out[name] = fold_one(w, a, b)
    return out

  return _walk(params, fold)


def attach(params: Any, fresh: Any) -> Any:
  """`params` (a plain model's) with the adapters of `fresh` (the same model with LoRA,
  freshly initialised) added next to the weights they adapt."""

  def add(p, f):
    if not isinstance(f, dict):
      return p
    out = dict(p)
    for k, v in f.items():
      if is_adapter(k):
        out[k] = v
      elif isinstance(v, dict):
        out[k] = add(p[k], v)
    return out

  return add(params, fresh)


def num_params(tree: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))
