"""Every trainer's jitted update donates its state: the old buffers are reused in place.

A train state is the parameters plus the optimizer state (two Adam moments: three times
the parameters), and each update replaces all of it. Without donation XLA must keep the
old state alive while it writes the new one, so an update needs twice the state's memory
on the accelerator; with `donate_argnums=(0,)` each old buffer becomes its successor.
Every trainer jits its update so (`sft`, `reward`, `dpo`, `ppo`, `grpo`; best-of-n has no
update) and never touches the old state after the call: its loop rebinds `state` at once.

Here each update is built as its trainer's `train` builds it (the same function, optimizer
and `donate_argnums`) on a tiny model, and called once: every leaf of the old state must be
deleted afterwards, which JAX does only when XLA could alias it to an output of the same
shape, dtype and layout (a leaf it cannot alias is silently kept), and the new state
must be whole.

`build` is shared with tests/trainers/test_bf16.py: it also gives each trainer's loss and
the arrays that feed it, for a model of either compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, optim, sharding
from rlhf_jax.data import pairs as pairs_lib
from rlhf_jax.rl import reward as reward_lib
from rlhf_jax.rl.logprobs import shift_for_next_token, token_logprobs
from rlhf_jax.trainers import dpo, grpo, ppo, reward, sft
from tests.trainers.test_rl_parts import (
  B,
  _grpo_settings,
  _ppo_settings,
  _score,
  fixed_rollout,
)

# A vocabulary unlike every other width of the model, so test_bf16 can tell logits apart.
VOCAB, T = 40, 12  # T: the SFT and DPO rows' length
TRAINERS = ("sft", "sft_accum", "reward", "dpo", "ppo", "ppo_policy_head", "grpo", "rloo")


def tiny_config(dtype: str = "float32"):
  """A one-layer model computing in `dtype` with float32 parameters."""
  return models.get_model_config(
    "tiny", vocab_size=VOCAB, d_model=32, num_layers=1, mlp_dim=64, dtype=dtype,
    param_dtype="float32",
  )  # fmt: skip


def _optimizer(**changes):
  """The trainers' optimizer (`optim.make_optimizer`): AdamW, clipping, a schedule."""
  section = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01, "schedule": "cosine"}
  return optim.make_optimizer({**section, "warmup_steps": 1, **changes}, 10)


def _params(module, seed: int = 0):
  """Plain float32 params of `module`, initialised in one compiled program (not op by op)."""
  init = jax.jit(lambda key: sharding.unbox(models.init_params(module, key)))
  return init(jax.random.key(seed))


def _rows(rng, rows: int, response_from: int = 3):
  """Right-padded rows [rows, T] with their masks; the loss reads from `response_from` on."""
  lengths = rng.integers(response_from + 2, T + 1, rows)
  mask = np.arange(T)[None] < lengths[:, None]
  tokens = np.where(mask, rng.integers(3, VOCAB, (rows, T)), 0).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(mask & (np.arange(T) >= response_from))


@dataclasses.dataclass
class Case:
  """One trainer's update on a tiny model, built as its `train` builds it.

  state(): a fresh initial state (an update consumes the one it is given); update: the
  jitted update, donating the state; args: its other arguments; params: what `loss`
  differentiates (the state's trained parameters); loss(params): the scalar loss the update
  descends; feeds(params): the arrays the loss is computed from (logits, log-probs,
  values, scores).
  """

  state: Callable[[], Any]
  update: Callable
  args: tuple
  params: Any
  loss: Callable[[Any], jax.Array]
  feeds: Callable[[Any], dict[str, jax.Array]]


@functools.cache  # one compile of each program per test session
def build(name: str, dtype: str = "float32") -> Case:
  """The `Case` of trainer `name` (one of TRAINERS) for a model computing in `dtype`.

  The parameters and the data (rollouts and their experience too) come from the float32
  model whatever `dtype` is, so the cases of two dtypes differ only in the compute.
  """
  f32, cfg = tiny_config(), tiny_config(dtype)
  rng = np.random.default_rng(0)
  key = jax.random.key(1)
  if name in ("sft", "sft_accum"):
    return _sft(f32, cfg, rng, key, accum=2 if name == "sft_accum" else 1)
  if name == "reward":
    return _reward(f32, cfg, rng, key)
  if name == "dpo":
    return _dpo(f32, cfg, rng)
  if name in ("ppo", "ppo_policy_head"):
    return _ppo(cfg, key, policy_head=name == "ppo_policy_head")
  if name in ("grpo", "rloo"):
    return _grpo(cfg, key, advantage=name)
  raise ValueError(name)


def _sft(f32, cfg, rng, key, accum: int) -> Case:
  module = models.LanguageModel(cfg)
  params = _params(models.LanguageModel(f32))
  tx, schedule = _optimizer(grad_accum_steps=accum)
  tokens, mask, loss_mask = _rows(rng, B)
  batch = {"tokens": tokens, "input_mask": mask, "loss_mask": loss_mask}
  init = jax.jit(functools.partial(sft.init_from, tx=tx))
  update = jax.jit(
    functools.partial(sft.update, module=module, tx=tx, schedule=schedule, accum=accum),
    donate_argnums=(0,),
  )

  def feeds(p):
    logits, _ = module.apply(
      {"params": p}, tokens, models.positions_from_mask(mask), models.causal_attention_mask(mask)
    )
    targets, _ = shift_for_next_token(tokens, loss_mask)
    return {"logits": logits, "logprobs": token_logprobs(logits, targets)}

  return Case(
    state=lambda: init(params, key),
    update=update,
    args=(batch,),
    params=params,
    loss=lambda p: sft.sft_loss(module, p, batch)[0],
    feeds=feeds,
  )


def _reward(f32, cfg, rng, key) -> Case:
  module = models.ScalarModel(cfg, head_init="reward")
  trunk = _params(models.LanguageModel(f32))["trunk"]
  tx, schedule = _optimizer()
  s = reward.Settings(members=2, use_margin=True, center_coef=0.01)
  # Two comparison groups of three responses and all three pairs of each.
  groups, responses = 2, 3
  tokens, mask, _ = _rows(rng, groups * responses)
  pairs = np.asarray([[0, 1], [0, 2], [1, 2]])
  batch = dict(
    tokens=tokens.reshape(groups, responses, T),
    mask=mask.reshape(groups, responses, T),
    chosen=jnp.asarray(np.tile(pairs[:, 0], (groups, 1)), jnp.int32),
    rejected=jnp.asarray(np.tile(pairs[:, 1], (groups, 1)), jnp.int32),
    margin=jnp.full((groups, 3), 0.5, jnp.float32),
    target=jnp.asarray([[1.0, 0.8, 1.0], [0.7, 1.0, 1.0]], jnp.float32),
    tie=jnp.asarray([[False, False, True], [False, False, False]]),
    valid=jnp.ones((groups, 3), bool),
  )
  init = jax.jit(
    functools.partial(
      reward.init_state, module=models.ScalarModel(f32), tx=tx, members=s.members,
      base_layers=f32.num_layers,
    )
  )  # fmt: skip
  update = jax.jit(
    functools.partial(reward.update, module=module, tx=tx, schedule=schedule, s=s),
    donate_argnums=(0,),
  )
  params = init(key, trunk)["params"]
  labels = {k: batch[k].reshape(-1) for k in pairs_lib.LABEL_FIELDS}

  def feeds(p):
    chosen, rejected = reward.pair_scores(p, batch, module=module)
    return {"chosen_scores": chosen, "rejected_scores": rejected}

  def loss(p):  # `reward.update`'s loss with every bootstrap weight 1
    chosen, rejected = reward.pair_scores(p, batch, module=module)
    per_member = jax.vmap(
      lambda c, r: reward_lib.bradley_terry_loss(
        c, r, margin=labels["margin"], tie=labels["tie"], target=labels["target"],
        weight=labels["valid"].astype(jnp.float32), center_coef=s.center_coef,
      )[0]
    )(chosen, rejected)  # fmt: skip
    return jnp.sum(per_member)

  return Case(
    state=lambda: init(key, trunk),
    update=update,
    args=(batch,),
    params=params,
    loss=loss,
    feeds=feeds,
  )


def _dpo(f32, cfg, rng) -> Case:
  module = models.LanguageModel(cfg)
  params = _params(models.LanguageModel(f32))
  tx, schedule = _optimizer()
  s = dpo.Settings(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, soft_ties=True)
  batch = {}
  for side in ("chosen", "rejected"):
    tokens, mask, loss_mask = _rows(rng, B)
    batch.update({f"{side}_tokens": tokens, f"{side}_mask": mask, f"{side}_loss_mask": loss_mask})
  # The reference's log-probs as `attach_reference` stores them: the f32 start's own.
  ref = dpo.pair_logps(params, batch, module=models.LanguageModel(f32))
  batch.update(
    ref_chosen=ref["chosen"] - 0.5,  # the policy already moved away from the reference
    ref_rejected=ref["rejected"] + 0.5,
    tie=jnp.asarray([False] * (B - 1) + [True]),
    valid=jnp.ones((B,), bool),
    target=jnp.full((B,), 0.9, jnp.float32),
  )
  init = jax.jit(functools.partial(dpo.init_state, tx=tx))
  update = jax.jit(
    functools.partial(dpo.update, module=module, tx=tx, schedule=schedule, s=s),
    donate_argnums=(0,),
  )

  def feeds(p):
    logps = dpo.pair_logps(p, batch, module=module)
    mask = batch["chosen_mask"]
    logits, _ = module.apply(
      {"params": p},
      batch["chosen_tokens"],
      models.positions_from_mask(mask),
      models.causal_attention_mask(mask),
    )
    return {"logits": logits, "chosen_logps": logps["chosen"], "rejected_logps": logps["rejected"]}

  def loss(p):
    per_pair, _, weight, _ = dpo.pair_terms(dpo.pair_logps(p, batch, module=module), batch, s=s)
    return dpo.weighted_mean(per_pair, weight)

  return Case(
    state=lambda: init(params), update=update, args=(batch,), params=params, loss=loss,
    feeds=feeds,
  )  # fmt: skip


def _ppo_networks(cfg, policy_head: bool):
  """(Networks, policy params, value params) as `ppo.networks` makes them."""
  lm = models.LanguageModel(cfg)
  if policy_head:
    params = _params(models.LanguageModel(tiny_config()))
    shardings = jax.tree.map(lambda _: None, params)  # what `networks` reads of a stage
    stage = types.SimpleNamespace(module=lm, params=params, shardings=shardings)
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
    nets, (policy, _), (value, _) = ppo.networks(stage, None, "policy_head", mesh, "fsdp")
    return nets, policy, value
  critic = models.ScalarModel(cfg, head_init="zeros")
  value = _params(models.ScalarModel(tiny_config(), head_init="zeros"), seed=1)
  return ppo.Networks(lm, critic, lm), _params(models.LanguageModel(tiny_config())), value


@functools.cache
def _ppo_rollout(policy_head: bool):
  """The float32 policy's and critic's params, and the experience of one rollout."""
  s = _ppo_settings(kl_controller="adaptive")
  nets, policy, value = _ppo_networks(tiny_config(), policy_head)
  tx, _ = _optimizer()
  state = ppo.init_state(policy, value, jax.random.key(1), policy_tx=tx, value_tx=tx, kl_coef=0.1)
  prompt, pmask, sample = fixed_rollout(VOCAB)
  experience = jax.jit(functools.partial(ppo.make_experience, nets=nets, rm_score=_score, s=s))
  exp, stats = experience(state, ppo.lm_params(policy), prompt, pmask, sample)
  return policy, value, exp, stats["objective/kl"]


def _ppo(cfg, key, policy_head: bool) -> Case:
  s = _ppo_settings(kl_controller="adaptive")
  tx, schedule = _optimizer()
  nets, _, _ = _ppo_networks(cfg, policy_head)
  policy, value, exp, kl = _ppo_rollout(policy_head)
  init = jax.jit(functools.partial(ppo.init_state, policy_tx=tx, value_tx=tx, kl_coef=0.1))
  update = jax.jit(
    functools.partial(ppo.update, nets=nets, policy_tx=tx, value_tx=tx, lr_schedule=schedule, s=s),
    donate_argnums=(0,),
  )

  def feeds(p):
    logp, logits, values = ppo.forward(
      nets, p["policy"], p["value"], exp["full"], exp["fmask"], exp["response"], s
    )
    return {"logits": logits, "logprobs": logp, "values": values}

  return Case(
    state=lambda: init(policy, value, key),
    update=update,
    args=(exp, kl),
    params={"policy": policy, "value": value},
    loss=lambda p: ppo.minibatch_loss(p["policy"], p["value"], exp, nets=nets, s=s)[0],
    feeds=feeds,
  )


def _grpo_settings_of(advantage: str):
  if advantage == "rloo":  # RLOO's way: the KL in the reward, leave-one-out baselines
    return _grpo_settings(advantage="rloo", kl_in_loss=False, kl_estimator="k1", epochs=2)
  return _grpo_settings(epochs=2)


@functools.cache
def _grpo_rollout(advantage: str):
  """The float32 policy's params, and the experience of one rollout with host scores."""
  s = _grpo_settings_of(advantage)
  module = models.LanguageModel(tiny_config())
  params = _params(module)
  state = grpo.init_state(params, jax.random.key(1), tx=_optimizer()[0])
  prompt, pmask, sample = fixed_rollout(VOCAB)
  host = jnp.asarray([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 8.0])
  experience = functools.partial(grpo.make_experience, module=module, rm_score=None, s=s)
  exp, _ = jax.jit(experience)(state, params, prompt, pmask, sample, host)
  return params, exp


def _grpo(cfg, key, advantage: str) -> Case:
  s = _grpo_settings_of(advantage)
  tx, schedule = _optimizer()
  module = models.LanguageModel(cfg)
  params, exp = _grpo_rollout(advantage)
  init = jax.jit(functools.partial(grpo.init_state, tx=tx))
  update = jax.jit(
    functools.partial(grpo.update, module=module, tx=tx, lr_schedule=schedule, s=s),
    donate_argnums=(0,),
  )

  def feeds(p):
    logp, logits = grpo.logps_fn(module, s)(p, exp["full"], exp["fmask"], exp["response"])
    return {"logits": logits, "logprobs": logp}

  return Case(
    state=lambda: init(params, key),
    update=update,
    args=(exp,),
    params=params,
    loss=lambda p: grpo.minibatch_loss(p, exp, module=module, s=s)[0],
    feeds=feeds,
  )


# ----------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", [t for t in TRAINERS if t != "rloo"])  # rloo: grpo's update
def test_update_donates_the_whole_state(name):
  case = build(name)
  state = case.state()
  old = jax.tree_util.tree_leaves_with_path(state)
  new, metrics = case.update(state, *case.args)
  jax.block_until_ready((new, metrics))
  kept = [jax.tree_util.keystr(path) for path, x in old if not x.is_deleted()]
  assert not kept, f"not donated: {kept}"
  assert not any(x.is_deleted() for x in jax.tree.leaves(new))
  assert jax.tree.structure(new) == jax.tree.structure(state)
  assert int(new["step"]) == 1
  # The next update takes the new state as the loop hands it on.
  newer, _ = case.update(new, *case.args)
  assert all(x.is_deleted() for x in jax.tree.leaves(new))
  assert int(newer["step"]) == 2
