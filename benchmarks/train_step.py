"""The timed pieces the benchmarks share (no flags: benchmarks/device_check.py imports this
after its correctness step, before which no JAX backend may open)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import models, sharding
from rlhf_jax.rl.logprobs import shift_for_next_token, token_logprobs


def time_fn(fn, steps: int) -> float:
  """Mean seconds of `fn()` over `steps` calls after one compiling call, blocking on results."""
  jax.block_until_ready(fn())
  start = time.perf_counter()
  out = None
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def time_train_step(cfg, mesh, rules, batch: int, seq_len: int, steps: int, timer=None) -> float:
  """Seconds per AdamW step of next-token training on random tokens [batch, seq_len],
  parameters and optimizer state sharded by `rules` and donated (after one compile run).
  `timer(run, steps)` times the step function `run` (default `time_fn`, the mean)."""
  module = models.LanguageModel(cfg)
  params, shardings = sharding.init_sharded(
    lambda r: models.init_params(module, r), mesh, rules, jax.random.key(0)
  )
  tx = optax.adamw(1e-4, weight_decay=0.01)
  opt_shardings = jax.tree.map(lambda x: x.sharding, jax.eval_shape(tx.init, params))

  def update(params, opt_state, tokens):
    def loss_fn(p):
      logits, _ = module.apply({"params": p}, tokens)
      targets, mask = shift_for_next_token(tokens, jnp.ones_like(tokens, jnp.bool_))
      return -jnp.sum(token_logprobs(logits, targets) * mask) / jnp.sum(mask)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq_len), dtype=np.int32)
  with sharding.use_mesh(mesh, rules):
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    tokens = sharding.host_to_global(tokens, mesh)
    step = jax.jit(
      update,
      in_shardings=(shardings, opt_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, opt_shardings, None),
      donate_argnums=(0, 1),
    )
    state = [params, opt_state]
    del params, opt_state

    def run():
      state[0], state[1], loss = step(state[0], state[1], tokens)
      return loss

    return (timer or time_fn)(run, steps)
