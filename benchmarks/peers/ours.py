"""This project's side of the peer benchmark: `python -m benchmarks.peers.ours --task=NAME`.

Each task runs the trainers' own module-level programs (the ones `train` runs) on the shape
of `shape.py`, one CPU device, and prints one JSON line (`shape.emit`).
"""

from __future__ import annotations

import functools
import os
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.peers import shape
from benchmarks.train_step import time_train_step
from rlhf_jax import models, sharding
from rlhf_jax.rl import dpo as dpo_lib
from rlhf_jax.rl import sampler as sampler_lib
from rlhf_jax.trainers import common, dpo, grpo, ppo, rl_common

RULES = "fsdp"


def model_config():
  return models.get_model_config(
    "tiny", vocab_size=shape.VOCAB, d_model=shape.WIDTH, num_layers=shape.LAYERS,
    num_heads=shape.HEADS, num_kv_heads=shape.HEADS, head_dim=shape.HEAD_DIM,
    mlp_dim=shape.MLP, rope_theta=shape.ROPE_THETA, norm_eps=shape.NORM_EPS,
    tie_embeddings=False, scan_layers=False,
  )  # fmt: skip


class Setup:
  """The mesh (one device), the modules and their sharded parameters."""

  def __init__(self):
    self.mesh = sharding.make_mesh((1, -1, 1))
    self.cfg = model_config()
    self.lm = models.LanguageModel(self.cfg)
    self.scalar = models.ScalarModel(self.cfg, head_init="zeros")
    self.rep = common.replicated(self.mesh)

  def init(self, module, seed: int):
    return sharding.init_sharded(
      lambda k: models.init_params(module, k), self.mesh, RULES, jax.random.key(seed)
    )

  def sampler(self, shardings, new_tokens: int = shape.NEW_TOKENS):
    config = sampler_lib.SamplerConfig(
      max_new_tokens=new_tokens, eos_id=shape.EOS, pad_id=shape.PAD, num_valid=shape.VOCAB
    )
    return sampler_lib.make_sampler(
      self.lm, config, mesh=self.mesh, rules=RULES, param_shardings=shardings
    )

  def prompts(self, rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, shape.VOCAB, (rows, shape.PROMPT_LEN)).astype(np.int32)
    tokens[:, 0] = shape.BOS
    with sharding.use_mesh(self.mesh, RULES):
      return (
        sharding.host_to_global(tokens, self.mesh),
        sharding.host_to_global(np.ones_like(tokens, bool), self.mesh),
      )

  def rollout_key(self, step: int):
    return jax.device_put(jax.random.fold_in(jax.random.key(7), step), self.rep)


def _rl_settings(cls, **fields):
  # The configs' default: the rollout's log-probs come from the sampler (configs/ppo.py);
  # RLHF_JAX_OLD_LOGPROBS=recompute measures the extra forward pass.
  common_fields = dict(
    prompt_len=shape.PROMPT_LEN, max_new_tokens=shape.NEW_TOKENS, temperature=1.0,
    missing_eos_score=None, clip_eps=0.2, loss_aggregation="token_mean", epochs=1,
    old_logprobs=os.environ.get("RLHF_JAX_OLD_LOGPROBS", "sampler"),
  )  # fmt: skip
  return cls(**{**common_fields, **fields})


def ppo_iteration(t: Setup):
  s = _rl_settings(
    ppo.Settings, minibatch_size=shape.ROLLOUTS, rollout_batch_size=shape.ROLLOUTS,
    kl_estimator="k1", whiten_rewards=False, gamma=1.0, lam=0.95, value_clip_eps=0.2,
    vf_coef=0.1, kl_controller="fixed", kl_target=6.0, kl_horizon=10000.0,
  )  # fmt: skip
  policy, policy_sh = t.init(t.lm, 0)
  value, value_sh = t.init(t.scalar, 1)
  reward_model = models.ScalarModel(t.cfg, head_init="reward")
  reward, _ = t.init(reward_model, 2)
  rm = types.SimpleNamespace(
    module=reward_model,
    params=jax.tree.map(lambda x: x[None], reward),
    gain=1.0,
    bias=0.0,
  )
  reference = jax.tree.map(jnp.copy, policy)
  tx = optax.adam(shape.LR)
  nets = ppo.Networks(t.lm, t.scalar, t.lm)
  init = functools.partial(ppo.init_state, policy_tx=tx, value_tx=tx, kl_coef=0.05)
  key = jax.random.key(3)
  state_sh = ppo.state_shardings(
    jax.eval_shape(init, policy, value, key), policy_sh, value_sh, t.mesh
  )
  programs = ppo.make_programs(
    nets, t.sampler(policy_sh), rl_common.rm_score_fn(rm, s.prompt_len), state_sh, policy_sh,
    t.mesh, policy_tx=tx, value_tx=tx, lr_schedule=lambda c: shape.LR, s=s,
  )  # fmt: skip
  state = [jax.jit(init, out_shardings=state_sh)(policy, value, key)]
  prompt, pmask = t.prompts(shape.ROLLOUTS)
  step = [0]

  def run():
    step[0] += 1
    with sharding.use_mesh(t.mesh, RULES):
      state[0], stats = ppo.iteration(
        programs, state[0], reference, prompt, pmask, t.rollout_key(step[0])
      )
    jax.block_until_ready((state[0], stats))

  return run


def dpo_step(t: Setup, prefix_sharing: bool = True):
  """The DPO trainer's update on the peer shape: pairs share their prompt (the first half of
  each row), read once with `prefix_sharing` (the trainer's default) or in both rows."""
  s = dpo.Settings(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, soft_ties=False)
  params, params_sh = t.init(t.lm, 0)
  rng = np.random.default_rng(0)
  b, n = shape.DPO_PAIRS, shape.DPO_LEN
  prompt = rng.integers(3, shape.VOCAB, (b, n // 2)).astype(np.int32)
  prompt[:, 0] = shape.BOS
  batch = {}
  for side in ("chosen", "rejected"):
    tokens = np.concatenate([prompt, rng.integers(3, shape.VOCAB, (b, n // 2))], 1)
    loss_mask = np.arange(n)[None, :] >= n // 2  # the response: the second half
    batch.update(
      {
        f"{side}_tokens": tokens.astype(np.int32),
        f"{side}_mask": np.ones((b, n), bool),
        f"{side}_loss_mask": np.broadcast_to(loss_mask, (b, n)).copy(),
      }
    )
  batch.update(
    ref_chosen=rng.normal(-100, 5, b).astype(np.float32),  # precomputed, as `attach_reference`
    ref_rejected=rng.normal(-100, 5, b).astype(np.float32),
    tie=np.zeros(b, bool),
    valid=np.ones(b, bool),
    target=np.ones(b, np.float32),
  )
  if prefix_sharing:  # as `dpo.train` lays out its tables
    batch = dpo.share_prompts(batch, dpo_lib.shared_widths([batch]), shape.PAD)
  tx = optax.adam(shape.LR)
  init = functools.partial(dpo.init_state, tx=tx)
  state_sh = dict(
    params=params_sh,
    opt_state=common.mirror_shardings(jax.eval_shape(tx.init, params), params, params_sh, t.mesh),
    step=t.rep,
  )
  with sharding.use_mesh(t.mesh, RULES):
    batch = {k: sharding.host_to_global(v, t.mesh) for k, v in batch.items()}
  update = jax.jit(
    functools.partial(dpo.update, module=t.lm, tx=tx, schedule=lambda c: shape.LR, s=s),
    in_shardings=(state_sh, None),
    out_shardings=(state_sh, t.rep),
    donate_argnums=(0,),
  )
  state = [jax.jit(init, out_shardings=state_sh)(params)]

  def run():
    with sharding.use_mesh(t.mesh, RULES):
      state[0], stats = update(state[0], batch)
    jax.block_until_ready((state[0], stats))

  return run


def grpo_iteration(t: Setup):
  rows = shape.GRPO_PROMPTS * shape.GRPO_GROUP
  s = _rl_settings(
    grpo.Settings, minibatch_size=rows, rollout_batch_size=rows, group_size=shape.GRPO_GROUP,
    advantage="grpo", scale_rewards=True, kl_in_loss=True, kl_estimator="k3", kl_coef=0.04,
  )  # fmt: skip
  params, params_sh = t.init(t.lm, 0)
  reference = jax.tree.map(jnp.copy, params)
  tx = optax.adam(shape.LR)
  init = functools.partial(grpo.init_state, tx=tx)
  key = jax.random.key(3)
  abstract = jax.eval_shape(init, params, key)
  opt_sh = common.mirror_shardings(abstract["policy_opt"], abstract["policy"], params_sh, t.mesh)
  state_sh = dict(policy=params_sh, policy_opt=opt_sh, step=t.rep, rng=t.rep)
  programs = grpo.make_programs(
    t.lm, t.sampler(params_sh), None, state_sh, params_sh, t.mesh, tx=tx,
    lr_schedule=lambda c: shape.LR, s=s,
  )  # fmt: skip
  state = [jax.jit(init, out_shardings=state_sh)(params, key)]
  prompt, pmask = t.prompts(shape.GRPO_PROMPTS)
  with sharding.use_mesh(t.mesh, RULES):
    prompt = sharding.host_to_global(np.repeat(sharding.fetch(prompt), shape.GRPO_GROUP, 0), t.mesh)
    pmask = sharding.host_to_global(np.ones((rows, shape.PROMPT_LEN), bool), t.mesh)

  def score_on_host(prompt, sample):
    """The rule reward, on the host as a text reward would be: the share of even tokens."""
    tokens, mask = sharding.fetch(sample.tokens), sharding.fetch(sample.response_mask)
    scores = np.sum((tokens % 2 == 0) * mask, -1) / np.maximum(mask.sum(-1), 1)
    return (sharding.global_from_full(scores.astype(np.float32), t.mesh),)

  step = [0]

  def run():
    step[0] += 1
    with sharding.use_mesh(t.mesh, RULES):
      state[0], stats = grpo.iteration(
        programs, state[0], reference, prompt, pmask, t.rollout_key(step[0]), score_on_host
      )
    jax.block_until_ready((state[0], stats))

  return run


def decode(t: Setup):
  params, params_sh = t.init(t.lm, 0)
  sample = t.sampler(params_sh)
  prompt, pmask = t.prompts(shape.ROLLOUTS)
  step = [0]

  def run():
    step[0] += 1
    jax.block_until_ready(sample(params, prompt, pmask, t.rollout_key(step[0])))

  return run


def main() -> None:
  task, repeats = shape.parse_args()
  t = Setup()
  if task == "train_step":
    # benchmarks/train_step.py: AdamW, params and optimizer state donated; timed like the
    # other tasks (the median of `repeats` after warm-up).
    timer = lambda run, n: shape.timed(lambda: jax.block_until_ready(run()), n)
    seconds = time_train_step(
      t.cfg, t.mesh, RULES, shape.TRAIN_BATCH, shape.TRAIN_LEN, repeats, timer=timer
    )
  else:
    build = dict(
      ppo=ppo_iteration,
      dpo=dpo_step,
      dpo_two_rows=functools.partial(dpo_step, prefix_sharing=False),
      grpo=grpo_iteration,
      decode=decode,
    )[task]
    seconds = shape.timed(build(t), repeats)
  shape.emit("rlhf_jax", task, seconds, jax=jax.__version__)


if __name__ == "__main__":
  main()
