"""bf16 compute with float32 master weights: log-softmax, heads and losses stay float32.

`model.dtype="bfloat16"` with `model.param_dtype="float32"` runs the matmuls in bfloat16
(half the memory traffic, the accelerators' fast path) while the parameters, their
gradients and the optimizer state stay float32. What must not drop to bfloat16 is what
differences of nearby numbers decide: the log-softmax over the vocabulary (a PPO ratio is
exp of a difference of two log-probs; bfloat16 keeps 8 significant bits, so rounding moves
a log-prob near -3.5 by up to 0.008 and the ratio of two by up to 1.6%, against a clip
range of 20%, before any update), the value and reward heads (a DPO or Bradley-Terry
margin is a difference of two scores) and the loss reductions. So the model gives float32
logits (the output projection accumulates in float32) and float32 scalar heads,
`token_logprobs` works in float32, and every loss casts its inputs to float32.

For every trainer (sft, also with gradient accumulation; reward; dpo; ppo, also with a
value head on the policy; grpo; rloo) and a tiny model computing in bfloat16, on the
parameters and data of its float32 twin (tests/trainers/test_donation.py's `build`):
  - no logits or log-softmax in bfloat16 anywhere in the loss's program, and the
    logits, log-probs, values and scores the loss reads are float32;
  - the loss is float32, and close to the float32 model's (bfloat16's precision);
  - the gradients are float32, and after an update (the trainer's own, jitted as its
    `train` jits it) the parameters, the optimizer state and the metrics are float32
    (dtypes are static, so `jax.eval_shape` gives them without compiling the update;
    test_donation.py runs the updates).
Best-of-n trains nothing; its reward-model scores and log-probs are checked alike.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from rlhf_jax import models
from rlhf_jax.trainers import rl_common
from tests.trainers.test_donation import TRAINERS, VOCAB, _params, build, tiny_config
from tests.trainers.test_rl_parts import N, P, fixed_rollout

# bfloat16 keeps 8 significant bits: ~0.4% relative error per op, a few percent end to end.
RTOL, ATOL = 0.05, 0.05


def _vocab_sized_bf16(fn, *args) -> list[str]:
  """The bfloat16 arrays of shape [..., VOCAB] (logits, log-softmax) that `fn` computes.

  A log-softmax in bfloat16 need not show in what `fn` returns: a reduction with a float32
  mask promotes it back. So the program itself is searched, sub-programs (scans, jits,
  custom derivatives) included. The weight matrices ([V, D] embedding) are 2-D and pass.
  """
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        aval = var.aval
        bf16 = getattr(aval, "dtype", None) == jnp.bfloat16
        if bf16 and aval.ndim >= 3 and aval.shape[-1] == VOCAB:
          found.append(f"{eqn.primitive.name}: {aval.str_short()}")
      for value in eqn.params.values():
        for sub in value if isinstance(value, tuple | list) else (value,):
          if isinstance(sub, jex_core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jex_core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def _assert_float32(tree, what: str) -> None:
  wrong = {
    jax.tree_util.keystr(path): str(x.dtype)
    for path, x in jax.tree_util.tree_leaves_with_path(tree)
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.float32
  }
  assert not wrong, f"{what} not float32: {wrong}"


def _assert_close(bf16, f32, what: str) -> None:
  """Relative l2 distance under RTOL (arrays), or within ATOL/RTOL (scalars)."""
  bf16, f32 = np.asarray(bf16, np.float64), np.asarray(f32, np.float64)
  if bf16.ndim == 0:
    np.testing.assert_allclose(bf16, f32, rtol=RTOL, atol=ATOL, err_msg=what)
    return
  distance = np.linalg.norm(bf16 - f32) / max(np.linalg.norm(f32), 1e-6)
  assert distance < RTOL, f"{what}: relative distance {distance:.4f}"


# Gradient accumulation and RLOO run the same loss code as sft and grpo (their updates'
# donation is checked in test_donation.py); leaving them out here saves a minute of CI.
@pytest.mark.parametrize("name", [t for t in TRAINERS if t not in ("sft_accum", "rloo")])
def test_bf16_compute_keeps_log_softmax_losses_and_weights_float32(name):
  f32, bf16 = build(name), build(name, "bfloat16")
  # The compute really is bfloat16, or this test would prove nothing; the logits and
  # their log-softmax are not.
  assert "bf16[" in str(jax.make_jaxpr(bf16.loss)(bf16.params))
  found = _vocab_sized_bf16(bf16.loss, bf16.params)
  assert not found, f"logits or log-softmax in bfloat16: {found}"
  _assert_float32(bf16.params, "master weights")

  # One program per dtype: what the loss reads, and the loss.
  feeds, loss = jax.jit(lambda p: (bf16.feeds(p), bf16.loss(p)))(bf16.params)
  feeds_f32, loss_f32 = jax.jit(lambda p: (f32.feeds(p), f32.loss(p)))(f32.params)
  _assert_float32(feeds, "what the loss reads")
  for key in feeds:
    _assert_close(feeds[key], feeds_f32[key], key)
  assert loss.dtype == jnp.float32
  _assert_close(loss, loss_f32, "loss")
  # Dtypes are static: tracing gives them without compiling the backward pass.
  _assert_float32(jax.eval_shape(jax.grad(bf16.loss), bf16.params), "gradients")
  new, metrics = jax.eval_shape(bf16.update, bf16.state(), *bf16.args)
  _assert_float32(new, "the state after an update")
  _assert_float32(metrics, "the update's metrics")


def test_best_of_n_scores_and_logprobs_float32():
  """Best-of-n ranks samples by the reward model's score and reports the KL of the pick
  from the policy's log-probs: both float32 with a bfloat16 model."""
  prompt, pmask, sample = fixed_rollout(VOCAB)
  full = jnp.concatenate([prompt, sample.tokens], axis=1)
  fmask = jnp.concatenate([pmask, sample.response_mask], axis=1)
  members = [_params(models.ScalarModel(tiny_config()), seed) for seed in (2, 3)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *members)
  policy = _params(models.LanguageModel(tiny_config()))
  out, logps = {}, {}
  for dtype in ("float32", "bfloat16"):
    cfg = tiny_config(dtype)
    rm = types.SimpleNamespace(module=models.ScalarModel(cfg), params=stacked, gain=1.5, bias=0.1)
    score = jax.jit(rl_common.rm_score_fn(rm, P))
    logps[dtype] = rl_common.response_logps_fn(models.LanguageModel(cfg), P, N, 0.7)
    logprobs, logits = jax.jit(logps[dtype])(policy, full, fmask, sample.tokens)
    out[dtype] = {"scores": score(full, fmask, sample.response_mask), "logprobs": logprobs,
                  "logits": logits}  # fmt: skip
  _assert_float32(out["bfloat16"], "best-of-n's scores and log-probs")
  found = _vocab_sized_bf16(logps["bfloat16"], policy, full, fmask, sample.tokens)
  assert not found, f"logits or log-softmax in bfloat16: {found}"
  for key, value in out["bfloat16"].items():
    _assert_close(value, out["float32"][key], key)
