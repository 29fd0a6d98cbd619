"""Optimizers from a config section: optax chain, learning-rate schedule, freezing, TF-style Adam.

One entry point, `make_optimizer(config, total_steps)`, turns an `optim` config section
(see `default_config`) into an `optax.GradientTransformation` and the learning-rate
schedule it uses, so a trainer can log `schedule(step)` beside its losses.

The chain, outermost first:

    freeze      optax.multi_transform: params matching `freeze` get exactly zero updates
                and no optimizer state at all (not even gradient accumulators).
    accumulate  optax.MultiSteps over `grad_accum_steps` micro-steps (mean of gradients).
    clip        global-norm clipping of the (accumulated) gradient of the trainable params.
    precondition  adam / adam_tf (TensorFlow's epsilon-hat Adam) / sgd (+ momentum).
    decay       decoupled weight decay (AdamW): update += weight_decay * param, only for
                params with ndim >= weight_decay_min_ndim (kernels, not biases/norm scales).
    lr          multiply by -schedule(update_count).

Every piece is jit-compatible and the optimizer state is a pytree of arrays (plus empty
nodes), so it can be built with `jax.eval_shape`, sharded like the params and saved by Orbax.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rlhf_jax import config_spec as cs
from rlhf_jax.errors import ConfigError

Schedule = Callable[[Any], jax.Array]

OPTIMIZER_NAMES = ("adamw", "adam_tf", "adam", "sgd")
SCHEDULE_NAMES = ("constant", "warmup_constant", "linear", "cosine")

# eps=None picks the customary value for the optimizer: PyTorch/optax Adam use 1e-8, while
# OpenAI's lm-human-preferences ran TensorFlow's AdamOptimizer with 1e-5 (docs/rlhf_details.md).
_DEFAULT_EPS = {"adamw": 1e-8, "adam": 1e-8, "adam_tf": 1e-5}


def default_config() -> ml_collections.ConfigDict:
  """The `optim` config section with every field `make_optimizer` reads.

  Fields:
    name: "adamw" | "adam_tf" | "adam" | "sgd". "adam" is plain Adam and refuses a
      nonzero weight_decay (say "adamw" to get decoupled decay); "adam_tf" is TensorFlow's
      Adam with epsilon outside the bias correction (see `scale_by_tf_adam`).
    lr: peak learning rate.
    b1, b2: Adam moment decay rates (unused by sgd).
    eps: Adam epsilon; None means 1e-8 for adam/adamw and 1e-5 for adam_tf.
    momentum: sgd momentum (0 = plain sgd); unused by the Adams.
    weight_decay: decoupled weight decay coefficient, multiplied by the scheduled lr
      (optax.adamw convention); 0 = off.
    weight_decay_min_ndim: decay only params with at least this many dimensions. The
      default 2 decays matrices (kernels, embeddings) but not biases and norm scales;
      0 decays everything.
    schedule: "constant" (ignores warmup_steps) | "warmup_constant" | "linear" (warmup,
      then linear decay to 0 at total_steps) | "cosine" (warmup, then cosine decay to
      final_lr_fraction * lr at total_steps). Warmup is linear from 0 at step 0.
    warmup_steps: number of warmup optimizer updates.
    final_lr_fraction: cosine end value as a fraction of lr.
    grad_clip_norm: clip the global gradient norm to this value; 0 or None = off.
    grad_accum_steps: average gradients over this many micro-steps per optimizer update
      (optax.MultiSteps); 1 = off. The schedule, warmup_steps and total_steps all count
      optimizer updates, not micro-steps.
    freeze: regexes, full-matched against '/'-joined parameter paths (e.g. "embedder/.*"
      or "params/embedder/.*" if the tree keeps Flax's "params" level). Matching params
      get zero updates and no optimizer state. A regex matching nothing is an error.
  """
  config = ml_collections.ConfigDict()
  config.name = "adamw"
  config.lr = 1e-5
  config.b1 = 0.9
  config.b2 = 0.999
  # A typed placeholder, so `--config.optim.eps=1e-5` parses as a float.
  config.eps = ml_collections.config_dict.placeholder(float)
  config.momentum = 0.0
  config.weight_decay = 0.0
  config.weight_decay_min_ndim = 2
  config.schedule = "constant"
  config.warmup_steps = 0
  config.final_lr_fraction = 0.0
  config.grad_clip_norm = 1.0
  config.grad_accum_steps = 1
  config.freeze = ()
  return config


# The declared check of every `optim` field (missing fields take default_config's values).
CONFIG_SPEC = cs.Spec(
  {
    "name": cs.Choice(*OPTIMIZER_NAMES),
    "lr": cs.Float(gt=0),
    "b1": cs.Float(min=0, lt=1),
    "b2": cs.Float(min=0, lt=1),
    "eps": cs.Optional(cs.Float(gt=0)),
    "momentum": cs.Float(min=0, lt=1),
    "weight_decay": cs.Float(min=0),
    "weight_decay_min_ndim": cs.Int(min=0),
    "schedule": cs.Choice(*SCHEDULE_NAMES),
    "warmup_steps": cs.Int(min=0),
    "final_lr_fraction": cs.Float(min=0, max=1),
    "grad_clip_norm": cs.Optional(cs.Float(min=0)),
    "grad_accum_steps": cs.Int(min=1),
    "freeze": cs.Seq(cs.Str(nonempty=True)),
  },
  required=False,
)


def check_steps(key: str, updates: Callable[[Any], int]) -> cs.CrossCheck:
  """A cross-field check: the `key` section's schedule fits `updates(section)` optimizer
  updates (e.g. warmup shorter than the run), named by the section's dotted key."""

  def check(section, prefix):
    try:
      make_optimizer(section[key], updates(section))
    except ValueError as error:
      raise ConfigError(f"{prefix}.{key}: {error}") from None

  return check


def l2_norm(tree: Any) -> jax.Array:
  """Global l2 norm of all leaves of `tree`, accumulated in float32.

  float32 because squaring bf16 gradients overflows/underflows long before the norm does.

  Args:
    tree: pytree of arrays of any shapes and float dtypes.
  Returns:
    [] float32 scalar; 0 for a tree with no leaves.
  """
  squares = [jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def scale_by_tf_adam(
  b1: float = 0.9, b2: float = 0.999, eps: float = 1e-5
) -> optax.GradientTransformation:
  """Adam as TensorFlow's AdamOptimizer computes it (OpenAI lm-human-preferences).

  At update t = 1, 2, ...:

      m_t = b1 m + (1 - b1) g
      v_t = b2 v + (1 - b2) g^2
      out = sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + eps)

  and the learning rate is applied by a later transform, so the step is -lr * out.
  The bias correction is folded into the step size and eps is added to the *uncorrected*
  sqrt(v_t) (the "epsilon hat" of Kingma & Ba, section 2). optax.scale_by_adam instead
  adds eps to sqrt(v_hat) = sqrt(v_t / (1 - b2^t)); the TF form equals optax's with eps
  replaced by eps / sqrt(1 - b2^t), i.e. a larger effective eps early in training
  (~31.6x at t = 1 for b2 = 0.999). With eps = 1e-5 this damps the first updates of
  parameters with small gradients, which PPO recipes reproduced from lm-human-preferences
  rely on.

  The state is `optax.ScaleByAdamState(count, mu, nu)`, so tools that look up "mu"/"nu"
  in Adam states work unchanged.

  Args:
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to sqrt(v_t), outside the bias correction.
  Returns:
    An optax.GradientTransformation; its updates have the same shapes/dtypes as the grads.
  """

  def init_fn(params):
    return optax.ScaleByAdamState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params),
      nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * g, updates, state.mu)
    nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * jnp.square(g), updates, state.nu)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    correction = jnp.sqrt(1 - b2**t) / (1 - b1**t)
    new_updates = jax.tree.map(
      lambda m, v: (correction * m / (jnp.sqrt(v) + eps)).astype(m.dtype), mu, nu
    )
    return new_updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def make_schedule(
  name: str,
  lr: float,
  total_steps: int,
  warmup_steps: int = 0,
  final_lr_fraction: float = 0.0,
) -> Schedule:
  """Learning rate as a function of the optimizer update count (0 for the first update).

  Args:
    name: one of SCHEDULE_NAMES (see `default_config`).
    lr: peak learning rate.
    total_steps: optimizer updates in the whole run; linear/cosine reach their end here.
    warmup_steps: linear warmup from 0 at step 0 to lr at step warmup_steps.
    final_lr_fraction: cosine end value as a fraction of lr.
  Returns:
    schedule(step) -> [] float32, for a Python int or a traced integer step.
  """
  if name not in SCHEDULE_NAMES:
    raise ValueError(f"Unknown schedule={name!r}; valid choices: {', '.join(SCHEDULE_NAMES)}.")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
  if name in ("linear", "cosine") and total_steps <= warmup_steps:
    raise ValueError(
      f"schedule={name!r} needs total_steps > warmup_steps, got total_steps={total_steps}, "
      f"warmup_steps={warmup_steps}."
    )
  if not 0.0 <= final_lr_fraction <= 1.0:
    raise ValueError(f"final_lr_fraction must be in [0, 1], got {final_lr_fraction}.")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if name == "constant":
      return jnp.full((), lr, jnp.float32)
    warmup = jnp.minimum(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    if name == "warmup_constant":
      return jnp.asarray(lr * warmup, jnp.float32)
    # Fraction of the post-warmup phase done, 0 at the end of warmup, 1 at total_steps.
    progress = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
    if name == "linear":
      decay = 1.0 - progress
    else:
      cosine = 0.5 * (1.0 + jnp.cos(math.pi * progress))
      decay = final_lr_fraction + (1.0 - final_lr_fraction) * cosine
    return jnp.asarray(lr * warmup * decay, jnp.float32)

  return schedule


def param_paths(tree: Any) -> Any:
  """Pytree like `tree` whose leaves are their '/'-joined paths, e.g. "dense/kernel"."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: jax.tree_util.keystr(path, simple=True, separator="/"), tree
  )


def frozen_mask(params: Any, freeze: Any) -> Any:
  """Which params the `freeze` regexes select.

  Args:
    params: pytree of arrays (or ShapeDtypeStructs).
    freeze: a regex or a sequence of regexes, each full-matched against param paths.
  Returns:
    Pytree like `params` with bool leaves, True where some regex matches.
  Raises:
    ValueError: naming any regex that is invalid or matches no parameter, because a typo
      there would otherwise silently train what was meant to stay frozen.
  """
  patterns = _as_patterns(freeze)
  paths = jax.tree.leaves(param_paths(params))
  for pattern in patterns:
    if not any(pattern.fullmatch(path) for path in paths):
      shown = ", ".join(paths[:20]) + (", ..." if len(paths) > 20 else "")
      raise ValueError(
        f"freeze regex {pattern.pattern!r} matches no parameter (regexes are full-matched "
        f"against '/'-joined paths); parameter paths are: {shown}"
      )
  return jax.tree.map(lambda path: any(p.fullmatch(path) for p in patterns), param_paths(params))


def make_optimizer(
  config: Any, total_steps: int, *, trainable: str | None = None
) -> tuple[optax.GradientTransformation, Schedule]:
  """Builds the optimizer described by an `optim` config section.

  Args:
    config: ml_collections.ConfigDict or plain mapping; missing fields take the values of
      `default_config()`, unknown fields are an error (they are usually typos).
    total_steps: optimizer updates in the run (not micro-steps when grad_accum_steps > 1).
    trainable: a regex (full-matched against parameter paths, as `freeze`): when given,
      every parameter it does not match is frozen too (LoRA: only the adapters train).
  Returns:
    (tx, schedule): tx.init(params) -> state, tx.update(grads, state, params) ->
    (updates, state), to be applied with optax.apply_updates; schedule(update_count) is
    the learning rate of that update. With grad_accum_steps = k, micro-step s belongs to
    update s // k.
  Raises:
    ValueError: for an unknown name or schedule (listing the valid choices), an invalid
      field value, or, at tx.init, a freeze regex that matches no parameter.
  """
  c = _resolve(config)
  name = c["name"]
  if name not in OPTIMIZER_NAMES:
    raise ValueError(f"Unknown name={name!r}; valid choices: {', '.join(OPTIMIZER_NAMES)}.")
  if c["weight_decay"] and name == "adam":
    raise ValueError(
      f"name='adam' with weight_decay={c['weight_decay']}: plain Adam has no weight decay; "
      "use name='adamw' for decoupled weight decay."
    )
  accum = c["grad_accum_steps"]
  if not isinstance(accum, int) or accum < 1:
    raise ValueError(f"grad_accum_steps must be an int >= 1, got {accum!r}.")
  schedule = make_schedule(
    c["schedule"], c["lr"], total_steps, c["warmup_steps"], c["final_lr_fraction"]
  )

  chain = []
  if c["grad_clip_norm"]:
    chain.append(optax.clip_by_global_norm(c["grad_clip_norm"]))
  eps = c["eps"] if c["eps"] is not None else _DEFAULT_EPS.get(name)
  if name in ("adamw", "adam"):
    chain.append(optax.scale_by_adam(b1=c["b1"], b2=c["b2"], eps=eps))
  elif name == "adam_tf":
    chain.append(scale_by_tf_adam(b1=c["b1"], b2=c["b2"], eps=eps))
  elif c["momentum"]:
    chain.append(optax.trace(decay=c["momentum"]))
  if c["weight_decay"]:
    min_ndim = c["weight_decay_min_ndim"]
    chain.append(
      optax.add_decayed_weights(
        c["weight_decay"], mask=lambda p: jax.tree.map(lambda x: x.ndim >= min_ndim, p)
      )
    )
  chain.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*chain)

  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()

  if _as_patterns(c["freeze"]) or trainable:
    # Freezing is outermost so frozen params have no moments, accumulators or share in
    # the clipping norm. Labels are computed from the tree at init (and at every update,
    # which is free under jit), so the non-matching-regex check sees the real params.
    freeze = c["freeze"]

    def labels(tree):
      frozen = frozen_mask(tree, freeze) if _as_patterns(freeze) else None
      keep = trainable_mask(tree, trainable) if trainable else None
      pick = lambda f, k: "frozen" if f is True or k is False else "trainable"
      if frozen is None:
        return jax.tree.map(lambda k: pick(None, k), keep)
      if keep is None:
        return jax.tree.map(lambda f: pick(f, None), frozen)
      return jax.tree.map(pick, frozen, keep)

    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def trainable_mask(params: Any, pattern: str) -> Any:
  """Which params `pattern` full-matches by '/'-joined path (the rest are frozen)."""
  compiled = re.compile(pattern)
  return jax.tree.map(lambda path: compiled.fullmatch(path) is not None, param_paths(params))


def _as_patterns(freeze: Any) -> list[re.Pattern]:
  """Compiles `freeze` (None, a regex, or a sequence of regexes)."""
  if freeze is None:
    return []
  if isinstance(freeze, str):
    # A bare string would otherwise be iterated character by character.
    freeze = (freeze,)
  patterns = []
  for pattern in freeze:
    try:
      patterns.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f"freeze regex {pattern!r} is invalid: {e}") from e
  return patterns


def _resolve(config: Any) -> dict[str, Any]:
  """Defaults overlaid with `config` (ConfigDict, FrozenConfigDict, mapping or None)."""
  resolved = default_config().to_dict()
  if config is None:
    return resolved
  given = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  unknown = sorted(set(given) - set(resolved))
  if unknown:
    raise ValueError(
      f"Unknown optimizer config field(s) {unknown}; valid fields: {', '.join(resolved)}."
    )
  resolved.update(given)
  return resolved
