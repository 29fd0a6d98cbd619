"""PPO against a reward model, with a KL penalty to the frozen SFT reference.

    python -m experiments.launch --config=configs/ppo.py

The module-level functions are the method (each unit-tested on small arrays in
tests/trainers/test_ppo_parts.py): `networks` (the policy, critic and reference and
their initial params), `init_state`, `make_experience` (one jitted program after
sampling) and `update` (the PPO epochs and the KL controller, one jitted program).
`train` wires them to the shared RL loop of rl_common: start, restore or init, the
iteration loop, finish.

One iteration: sample responses for a batch of prompts with the jitted KV-cache
sampler; in one jitted function recompute the policy's and the reference's
log-probs at the sampling temperature, the values and the reward-model score
(read at each response's last token), the per-token KL penalty, rewards, GAE
and whitened advantages; then, in one jitted update, several epochs over
shuffled minibatches of the clipped policy and value losses. No Python loop
over tokens and no host round trip inside an update.

The critic is, by `config.value_model`, either a separate value network
initialised from the reward model (`separate`, the "N+ implementation
details" default) or a zero-initialised value head on the policy's trunk
(`policy_head`, one forward pass, value loss shaping the shared trunk). The
reference is the SFT policy, frozen twice: no optimizer state and
`stop_gradient` on its log-probs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import logging

from rlhf_jax import config_spec as cs
from rlhf_jax import errors, exporters, hf, models, monitor, optim, rng, sharding
from rlhf_jax.models import lora
from rlhf_jax.rl import advantages as adv_lib
from rlhf_jax.rl import kl as kl_lib
from rlhf_jax.rl import ppo_losses
from rlhf_jax.rl import sampler as sampler_lib
from rlhf_jax.rl.logprobs import entropy_from_logits, token_logprobs
from rlhf_jax.trainers import common, rl_common

# Metrics that depend on wall-clock time (left out when runs are compared).
TIMING_METRICS = rl_common.TIMING_METRICS

VALUE_MODELS = ("separate", "policy_head")
# Under LoRA the value head on the policy trains beside the adapters (`lora.trainable`).
VALUE_HEAD = "value/.*"


def _updates(config) -> int:
  """Optimizer updates in the run: iterations x epochs x minibatches."""
  return (
    rl_common.schedule_steps(config)
    * config.ppo_epochs
    * (config.rollout_batch_size // config.minibatch_size)
  )


def check_kl_controller(config, prefix: str) -> None:
  """beta <- beta * (1 + e n / horizon), e in [-0.2, 0.2]: beta stays > 0 only if n < 5 horizon."""
  kl, n = config.kl, config.rollout_batch_size
  if kl.controller == "adaptive" and not n < 5 * kl.horizon:
    raise cs.ConfigError(
      f"{prefix}.kl.horizon={kl.horizon:g} is too short for {prefix}.rollout_batch_size={n}: "
      "the adaptive controller multiplies beta by 1 + e * n / horizon with e down to -0.2, "
      f"so beta turns negative unless horizon > n / 5 = {n / 5:g} (the usual horizon is "
      "10000 episodes)."
    )


def check_value_init(config, prefix: str) -> None:
  """value_init starts a separate critic; with a value head on the policy it has no use."""
  if config.value_init and config.value_model != "separate":
    raise cs.ConfigError(
      f"{prefix}.value_init={config.value_init!r} starts a separate critic, but "
      f"{prefix}.value_model={config.value_model!r}; set value_model='separate' or clear "
      "value_init."
    )


# One declared check per field of configs/ppo.py (see rlhf_jax/config_spec.py).
CONFIG_SPEC = cs.Spec(
  {
    "exporters": exporters.CONFIG_SPEC,
    **cs.RUN_FIELDS,
    **cs.LOOP_FIELDS,
    **rl_common.UPSTREAM_FIELDS,
    **rl_common.REFERENCE_FIELDS,
    **rl_common.CONTINUE_FIELDS,
    **rl_common.SAMPLING_FIELDS,
    **rl_common.OLD_LOGPROBS_FIELDS,
    **rl_common.MISSING_EOS_FIELDS,
    "data": rl_common.PROMPT_DATA_SPEC,
    "rollout_batch_size": cs.Int(min=1),
    "ppo_epochs": cs.Int(min=1),
    "minibatch_size": cs.Int(min=1),
    "clip_eps": cs.Float(gt=0),
    "value_clip_eps": cs.Float(gt=0),
    "vf_coef": cs.Float(min=0),
    "gamma": cs.Float(min=0, max=1),
    "lam": cs.Float(min=0, max=1),
    "whiten_rewards": cs.Bool(),
    "value_model": cs.Choice(*VALUE_MODELS),
    "value_init": cs.HfModel(),
    "lora": lora.CONFIG_SPEC,
    "loss_aggregation": cs.Choice(*rl_common.LOSS_AGGREGATIONS),
    "kl": cs.Spec(
      {
        "estimator": cs.Choice("k1", "k2", "k3"),
        "controller": cs.Choice("fixed", "adaptive"),
        "init_coef": cs.Float(min=0),
        "target": cs.Float(gt=0),
        "horizon": cs.Float(gt=0),
      }
    ),
    "optim": optim.CONFIG_SPEC,
    "monitor": monitor.CONFIG_SPEC,
    "value_optim": optim.CONFIG_SPEC,
    "eval": rl_common.EVAL_SPEC,
  },
  checks=(
    rl_common.check_reference,
    rl_common.check_continue,
    cs.divides("minibatch_size", "rollout_batch_size"),
    check_kl_controller,
    check_value_init,
    lora.check_no_dropout,
    optim.check_steps("optim", _updates),
    rl_common.check_eval,
    optim.check_steps("value_optim", _updates),
    cs.mesh_batch("rollout_batch_size", "minibatch_size"),
  ),
)

# ------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings(rl_common.RolloutSettings):
  """The static values PPO's jitted functions read, from the config (`from_config`)."""

  kl_estimator: str
  whiten_rewards: bool
  gamma: float
  lam: float
  value_clip_eps: float
  vf_coef: float
  kl_controller: str
  kl_target: float
  kl_horizon: float

  @classmethod
  def from_config(cls, config) -> Settings:
    shared = cls.fields(
      config, epochs=config.ppo_epochs, rollout_batch_size=config.rollout_batch_size
    )
    return cls(
      **shared,
      kl_estimator=config.kl.estimator,
      whiten_rewards=config.whiten_rewards,
      gamma=config.gamma,
      lam=config.lam,
      value_clip_eps=config.value_clip_eps,
      vf_coef=config.vf_coef,
      kl_controller=config.kl.controller,
      kl_target=config.kl.target,
      kl_horizon=config.kl.horizon,
    )


# ------------------------------------------------------------------- networks


@dataclasses.dataclass(frozen=True)
class Networks:
  """The policy (with a value head when `value` is None), the critic and the reference."""

  policy: models.LanguageModel
  value: models.ScalarModel | None
  reference: models.LanguageModel


def lm_params(policy: dict) -> dict:
  """The language-model part of the policy's params (what the sampler and evals see)."""
  return {k: v for k, v in policy.items() if k != "value"}


def networks(sft, rm, value_model: str, mesh, rules, value_init: str = "", reference=None):
  """(Networks, (policy params, shardings), (value params, shardings)) at the start.

  `sft`: the policy to train (the SFT policy, or it with LoRA adapters); `reference`: the
  frozen reference's module (default: the policy's). "separate": the critic is a value
  network initialised from reward member 0 (trunk and head), or from `value_init`
  (`critic_start`); "policy_head": a zero-initialised value head joins the policy's params
  as a "value" subtree and the critic's slot stays empty.
  """
  reference = reference or sft.module
  if value_model == "policy_head":
    policy = models.LanguageModel(sft.module.config, value_head=True)
    boxed = jax.eval_shape(lambda: models.init_params(policy, jax.random.key(0)))
    head_shapes = sharding.unbox(boxed["value"])
    head_sh = sharding.tree_shardings(
      head_shapes, sharding.logical_specs(boxed["value"]), mesh, rules
    )
    head = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), head_shapes)
    nets = Networks(policy, None, reference)
    return nets, ({**sft.params, "value": head}, {**sft.shardings, "value": head_sh}), ({}, {})
  if value_init:
    value, params, value_sh = critic_start(value_init, sft.tokenizer, mesh, rules)
  else:
    value = models.ScalarModel(rm.module.config, head_init="zeros")
    params = jax.tree.map(lambda x: x[0], rm.params)
    value_sh = jax.tree.map(lambda s: rl_common.drop_leading(s, mesh), rm.shardings)
  return (
    Networks(sft.module, value, reference),
    (sft.params, sft.shardings),
    (params, value_sh),
  )


def critic_start(path: str, tokenizer, mesh, rules):
  """(value network, params, shardings) of a critic started from `hf:DIR`: a one-label
  classifier's trunk and head, or a causal LM's trunk with a zero head. The model must read
  the policy's tokens (`hf.tokenizer_mismatch`)."""
  problem = hf.tokenizer_mismatch(path, tokenizer)
  if problem:
    raise errors.ConfigError(f"config.value_init={path!r}: {problem}.")
  if hf.is_classifier(path):
    start = hf.load_reward_model(path, mesh, rules)
    params = jax.tree.map(lambda x: x[0], start.params)
    shardings = jax.tree.map(lambda s: rl_common.drop_leading(s, mesh), start.shardings)
    return models.ScalarModel(start.module.config, head_init="zeros"), params, shardings
  start = hf.load_policy(path, mesh, rules)
  value = models.ScalarModel(start.module.config, head_init="zeros")
  boxed = jax.eval_shape(lambda: models.init_params(value, jax.random.key(0)))
  shapes = sharding.unbox(boxed)
  shardings = sharding.tree_shardings(shapes, sharding.logical_specs(boxed), mesh, rules)
  head = jax.tree.map(
    lambda x, s: jax.device_put(jnp.zeros(x.shape, x.dtype), s), shapes["head"], shardings["head"]
  )
  return value, {"trunk": start.params["trunk"], "head": head}, shardings


def init_state(policy, value, key, *, policy_tx, value_tx, kl_coef: float):
  """The training state: params, optimizer states, the KL controller, step and RNG."""
  return dict(
    policy=policy,
    value=value,
    policy_opt=policy_tx.init(policy),
    value_opt=value_tx.init(value),
    kl=kl_lib.init_kl_controller(kl_coef),
    step=jnp.zeros((), jnp.int32),
    rng=key,
  )


def state_shardings(abstract, policy_sh, value_sh, mesh) -> dict:
  """Shardings of the state: optimizer moments like their params, the rest replicated."""
  rep = common.replicated(mesh)
  return dict(
    policy=policy_sh,
    value=value_sh,
    policy_opt=common.mirror_shardings(abstract["policy_opt"], abstract["policy"], policy_sh, mesh),
    value_opt=common.mirror_shardings(abstract["value_opt"], abstract["value"], value_sh, mesh),
    kl=jax.tree.map(lambda _: rep, abstract["kl"]),
    step=rep,
    rng=rep,
  )


def critic_values(nets: Networks, value, full, fmask, s: Settings):
  """V(s_t) [B, N] of a separate critic (see `forward`)."""
  positions = models.positions_from_mask(fmask)
  attn = models.causal_attention_mask(fmask)
  values = nets.value.apply({"params": value}, full, positions, attn)
  return values[:, slice(*rl_common.response_window(s.prompt_len, s.max_new_tokens))]


def forward(nets: Networks, policy, value, full, fmask, response, s: Settings):
  """Log-probs [B, N] at the sampling T, response logits, and V(s_t) [B, N].

  V(s_t) is read at the position that predicts response token t, i.e. the value of the
  state before that token.
  """
  positions = models.positions_from_mask(fmask)
  attn = models.causal_attention_mask(fmask)
  window = rl_common.response_window(s.prompt_len, s.max_new_tokens)
  apply = functools.partial(nets.policy.apply, logits_window=window)
  if nets.value is None:
    resp_logits, _, values = apply({"params": policy}, full, positions, attn)
  else:
    resp_logits, _ = apply({"params": policy}, full, positions, attn)
    values = nets.value.apply({"params": value}, full, positions, attn)
  values = values[:, slice(*window)]
  return token_logprobs(resp_logits, response, s.temperature), resp_logits, values


# ----------------------------------------------------------------- experience


def make_experience(state, ref_params, prompt, pmask, sample, *, nets: Networks, rm_score, s):
  """One rollout's training arrays and statistics, in one program after sampling.

  The policy's and the reference's log-probs at the sampling temperature, the values,
  the reward-model score `rm_score(full, fmask, rmask)` read at each response's last
  token, the per-token KL penalty, rewards (score at the last token, missing-EOS penalty,
  minus coef x KL per token), GAE and whitened advantages.
  """
  response, rmask = sample.tokens, sample.response_mask
  full = jnp.concatenate([prompt, response], axis=1)
  fmask = jnp.concatenate([pmask, rmask], axis=1)
  if s.old_logprobs == "sampler" and nets.value is not None:
    # The sampler's log-probs: only the critic runs over the rollout.
    logp, values = sample.logprobs, critic_values(nets, state["value"], full, fmask, s)
    entropy = -jnp.sum(logp * rmask)  # the drawn tokens' surprisal: an entropy estimate
  else:
    logp, resp_logits, values = forward(
      nets, state["policy"], state["value"], full, fmask, response, s
    )
    entropy = jnp.sum(entropy_from_logits(resp_logits, s.temperature) * rmask)
    if s.old_logprobs == "sampler":  # a value head: the forward runs anyway, for values
      logp = sample.logprobs
  ref_fn = rl_common.response_logps_fn(
    nets.reference, s.prompt_len, s.max_new_tokens, s.temperature
  )
  if ref_params is None:  # LoRA: the reference is the policy's own frozen base
    ref_params = lora.base(lm_params(state["policy"]))
  ref_logp = jax.lax.stop_gradient(ref_fn(ref_params, full, fmask, response)[0])
  scores = rm_score(full, fmask, rmask)
  kl = kl_lib.kl_penalty(logp, ref_logp, s.kl_estimator, rmask)
  rewards, non_score, used_scores = adv_lib.assemble_rewards(
    scores,
    kl,
    rmask,
    state["kl"].kl_coef,
    has_eos=sample.has_eos,
    missing_eos_score=s.missing_eos_score,
  )
  if s.whiten_rewards:
    rewards = adv_lib.whiten(rewards, rmask, shift_mean=False)
  advantages, returns = adv_lib.gae(rewards, values, rmask, s.gamma, s.lam)
  advantages = adv_lib.whiten(advantages, rmask)
  exp = dict(
    full=full,
    fmask=fmask,
    response=response,
    rmask=rmask,
    old_logp=logp,
    old_values=values,
    advantages=advantages,
    returns=returns,
  )
  seq_kl = kl_lib.objective_kl(kl_lib.kl_penalty(logp, ref_logp, "k1", rmask), rmask)
  stats = {
    "objective/kl": seq_kl,
    "objective/kl_coef": state["kl"].kl_coef,
    "objective/entropy": entropy / jnp.maximum(rmask.shape[0], 1),
    "objective/scores": jnp.mean(used_scores),
    "objective/rm_scores": jnp.mean(scores),
    "objective/non_score_reward": jnp.mean(non_score),
    "returns/mean": adv_lib.masked_mean(returns, rmask),
    "returns/var": adv_lib.masked_var(returns, rmask),
    "val/vpred_rollout": adv_lib.masked_mean(values, rmask),
    "response_length": jnp.mean(jnp.sum(rmask, axis=-1).astype(jnp.float32)),
    "frac_no_eos": 1.0 - jnp.mean(sample.has_eos.astype(jnp.float32)),
  }
  return exp, stats


# --------------------------------------------------------------------- update


def minibatch_loss(policy, value, mb, *, nets: Networks, s: Settings):
  """The clipped policy loss plus vf_coef x the clipped value loss of one minibatch."""
  logp, resp_logits, vpred = forward(
    nets, policy, value, mb["full"], mb["fmask"], mb["response"], s
  )
  mode = s.loss_aggregation
  pg_loss, pg_stats = ppo_losses.policy_loss(
    logp, mb["old_logp"], mb["advantages"], mb["rmask"], clip_eps=s.clip_eps, mode=mode
  )
  vf_loss, vf_stats = ppo_losses.value_loss(
    vpred, mb["old_values"], mb["returns"], mb["rmask"], clip_eps=s.value_clip_eps, mode=mode
  )
  entropy = ppo_losses.masked_entropy(
    resp_logits, mb["rmask"], temperature=s.temperature, mode=mode
  )
  stats = {
    "loss/policy": pg_loss,
    "loss/value": vf_loss,
    "policy/entropy": entropy,
    "val/vpred": adv_lib.masked_mean(vpred, mb["rmask"]),
    "val/error": adv_lib.masked_mean(jnp.square(vpred - mb["returns"]), mb["rmask"]),
    "val/var_explained": adv_lib.explained_variance(vpred, mb["returns"], mb["rmask"]),
    **{f"policy/{k}": v for k, v in pg_stats.items()},
    **{f"val/{k}": v for k, v in vf_stats.items()},
  }
  return pg_loss + s.vf_coef * vf_loss, stats


def update(state, exp, kl, *, nets: Networks, policy_tx, value_tx, lr_schedule, s: Settings):
  """`s.epochs` passes of minibatch updates of policy and critic, then the KL controller
  (adaptive: towards `s.kl_target` with the rollout's KL `kl`)."""
  rng, perm_rng = jax.random.split(state["rng"])
  # LoRA: gradients of the adapters (and a value head on the policy) only.
  trainable = lora.trainable(nets.policy.config, VALUE_HEAD)

  def step(carry, mb):
    policy, value, policy_opt, value_opt = carry
    (_, stats), (g_policy, g_value) = jax.value_and_grad(
      lambda p, v, mb: minibatch_loss(lora.stop_frozen(p, trainable), v, mb, nets=nets, s=s),
      argnums=(0, 1),
      has_aux=True,
    )(policy, value, mb)
    u_policy, policy_opt = policy_tx.update(g_policy, policy_opt, policy)
    u_value, value_opt = value_tx.update(g_value, value_opt, value)
    stats["policy/grad_norm"] = optim.l2_norm(g_policy)
    stats["policy/update_norm"] = optim.l2_norm(u_policy)
    stats["val/grad_norm"] = optim.l2_norm(g_policy["value"] if nets.value is None else g_value)
    new = (
      optax.apply_updates(policy, u_policy),
      optax.apply_updates(value, u_value),
      policy_opt,
      value_opt,
    )
    return new, stats

  carry = (state["policy"], state["value"], state["policy_opt"], state["value_opt"])
  (policy, value, policy_opt, value_opt), stats = rl_common.scan_minibatches(
    step, carry, exp, perm_rng, epochs=s.epochs, minibatch_size=s.minibatch_size
  )
  stats["lr"] = lr_schedule(state["step"] * s.updates_per_iteration)
  stats["policy/param_norm"] = optim.l2_norm(lm_params(policy))
  kl_state = kl_lib.update_kl_controller(
    state["kl"],
    kl,
    s.rollout_batch_size,
    kind=s.kl_controller,
    target=s.kl_target,
    horizon=s.kl_horizon,
  )
  new = dict(
    state,
    policy=policy,
    value=value,
    policy_opt=policy_opt,
    value_opt=value_opt,
    kl=kl_state,
    step=state["step"] + 1,
    rng=rng,
  )
  return new, stats


class Programs(NamedTuple):
  """One PPO iteration's jitted programs, laid out as `train` lays them out (`iteration`)."""

  sample: Callable  # (lm params, prompt, pmask, key) -> SampleOutput
  experience: Callable  # (state, reference params, prompt, pmask, sample) -> (exp, stats)
  update: Callable  # (state, exp, kl) -> (state, stats); donates the state


def make_programs(
  nets: Networks, sample_fn, rm_score, state_sh, ref_sh, mesh, *, policy_tx, value_tx,
  lr_schedule, s: Settings,
) -> Programs:  # fmt: skip
  """Jits `make_experience` and `update` for the state's shardings `state_sh` (see
  `state_shardings`); `ref_sh`: the reference parameters' (None: wherever they are)."""
  rep = common.replicated(mesh)
  batch_sh, sample_sh = sharding.batch_sharding(mesh, 2), sampler_lib.output_shardings(mesh)
  experience = jax.jit(
    functools.partial(make_experience, nets=nets, rm_score=rm_score, s=s),
    in_shardings=(state_sh, ref_sh, batch_sh, batch_sh, sample_sh),
  )
  update_fn = jax.jit(
    functools.partial(
      update, nets=nets, policy_tx=policy_tx, value_tx=value_tx, lr_schedule=lr_schedule, s=s
    ),
    in_shardings=(state_sh, None, rep),
    out_shardings=(state_sh, rep),
    donate_argnums=(0,),
  )
  return Programs(sample_fn, experience, update_fn)


def iteration(programs: Programs, state, ref_params, prompt, pmask, key, phases=None):
  """One iteration on device, no host round trip: sample, score into experience, update.

  Call it under the mesh (`sharding.use_mesh`) with the prompts already on it. `phases`
  (`rl_common.PhaseClock`) sees each program's output, to time the phases on log steps.
  Returns the new state and the iteration's statistics, still on device.
  """
  phases = phases or (lambda out: out)
  sample = phases(programs.sample(lm_params(state["policy"]), prompt, pmask, key))
  exp, exp_stats = phases(programs.experience(state, ref_params, prompt, pmask, sample))
  state, upd_stats = phases(programs.update(state, exp, exp_stats["objective/kl"]))
  return state, {**exp_stats, **upd_stats}


def flops_per_iteration(model_config, s: Settings, separate_critic: bool, ensemble: int) -> float:
  """Model FLOPs of one iteration: epochs of policy (+ critic) forward-backward, and the
  forwards of the old policy, (critic,) reference and reward ensemble."""
  seq = s.prompt_len + s.max_new_tokens
  per_seq = seq * model_config.train_flops_per_token(seq)
  networks = 2 if separate_critic else 1
  return s.rollout_batch_size * per_seq * (s.epochs * networks + (1 + networks + ensemble) / 3)


# ---------------------------------------------------------------------- train


def train(config: Any, workdir: str) -> dict[str, float]:
  """Runs PPO; returns the final eval metrics and writes `<workdir>/summary.json`."""
  CONFIG_SPEC.validate(config)
  s = Settings.from_config(config)
  total_updates = rl_common.schedule_steps(config) * s.updates_per_iteration
  # With LoRA only the adapters (and a value head on the policy) train.
  trainable = lora.trainable(config.lora.rank, VALUE_HEAD)
  policy_tx, lr_schedule = optim.make_optimizer(config.optim, total_updates, trainable=trainable)
  value_tx, _ = optim.make_optimizer(config.value_optim, total_updates)
  run = rl_common.start(config, workdir, batch_size=s.rollout_batch_size)
  with run:  # closes the checkpointer and the metric writer on the way out
    mesh, rules, sft, rm = run.mesh, run.rules, run.sft, run.rm
    # The policy trained: the SFT policy, or it with fresh LoRA adapters, whose base then is
    # the reference too (one copy: `rl_common.LoraPolicy`).
    adapted = (
      rl_common.LoraPolicy(sft, config.lora, config.seed, mesh, rules) if config.lora.rank else None
    )
    policy = adapted.policy if adapted else sft

    # ------------------------------------------- networks, state, jitted programs
    nets, (policy_init, policy_sh), (value_init, value_sh) = networks(
      policy, rm, config.value_model, mesh, rules, config.value_init, reference=sft.module
    )
    ref = run.reference  # the KL reference: sft, unless config.reference_init
    init = functools.partial(
      init_state, policy_tx=policy_tx, value_tx=value_tx, kl_coef=config.kl.init_coef
    )
    key = rng.key(config.seed, "init")
    abstract = jax.eval_shape(init, policy_init, value_init, key)
    state_sh = state_shardings(abstract, policy_sh, value_sh, mesh)
    sample_fn = rl_common.sampler(policy, config, mesh, rules)
    programs = make_programs(
      nets, sample_fn, rl_common.rm_score_fn(rm, s.prompt_len), state_sh,
      None if adapted else ref.shardings, mesh, policy_tx=policy_tx, value_tx=value_tx,
      lr_schedule=lr_schedule, s=s,
    )  # fmt: skip
    # With LoRA the SFT parameters are given to the state (donated) and then released.
    donate = (0,) if adapted else ()
    state, clock = common.restore_or_init(
      run,
      common.with_shardings(abstract, state_sh),
      lambda: jax.jit(init, out_shardings=state_sh, donate_argnums=donate)(
        policy_init, value_init, key
      ),
    )
    reference = ref
    if adapted:
      policy_init = None
      adapted.release(sft)
      reference = adapted.reference_view(lambda: lm_params(state["policy"]))

    # ------------------------------------------------------ evaluator, loop
    logps_fn = rl_common.response_logps_fn(
      policy.module, s.prompt_len, s.max_new_tokens, s.temperature
    )
    evaluate = rl_common.make_evaluator(
      config, workdir, run.prompt_set.eval, sft=reference, rm=rm, sample_fn=sample_fn,
      logps_fn=logps_fn, mesh=mesh, rules=rules, start_step=run.start_step,
      exporter=run.writer.exporter, model_config=policy.module.config,
    )  # fmt: skip
    flops = flops_per_iteration(sft.module.config, s, nets.value is not None, rm.ensemble_size)
    loop = common.bookkeeping(
      run,
      flops_per_step=flops,
      dtype=sft.module.config.dtype,
      metric_keys=("objective/scores", "objective/kl", "eval/gold_reward"),
    )
    common.evaluate_start(run, lambda: evaluate(lm_params(state["policy"]), run.start_step))
    rollout_key = rng.key(config.seed, "rollout")
    tokens = float(s.rollout_batch_size * (s.prompt_len + s.max_new_tokens))
    step = run.start_step
    while step < config.total_steps and rl_common.stopped_by_alert(evaluate) is None:
      batch = next(run.loader)
      phases = rl_common.PhaseClock((step + 1) % config.log_every == 0, state)
      with sharding.use_mesh(mesh, rules):
        prompt = sharding.host_to_global(batch["tokens"], mesh)
        pmask = sharding.host_to_global(batch["mask"], mesh)
        key = jax.random.fold_in(rollout_key, step)
        state, stats = iteration(programs, state, ref.params, prompt, pmask, key, phases)
      step += 1
      preempted = run.ckpt.preemption_requested(step)
      stats = {**stats, **phases.metrics()}
      loop.after_update(
        step, stats, tokens, lambda: evaluate(lm_params(state["policy"]), step), preempted=preempted
      )
      if rl_common.stopped_by_alert(evaluate) == step:
        loop.should_save = True  # the stage ends here: its last checkpoint and export
      common.save_if_due(run, loop, step, state, clock)
      if preempted:
        logging.warning("SIGTERM: saved iteration %d and stopping; rerun to resume.", step)
        break
  return rl_common.finish(
    run,
    loop,
    step,
    params=lambda: lm_params(state["policy"]),
    evaluate=evaluate,
    method="ppo",
    clock=clock,
    evaluator=evaluate.judge.name,
    model_config=policy.module.config,
    tokenizer_file=sft.tokenizer.filename,
    summary={"kl_coef": float(jax.device_get(state["kl"].kl_coef))},
    watch=evaluate.watch,
  )
