"""GRPO and RLOO: a group baseline instead of a critic, KL to the frozen SFT reference.

    python -m experiments.launch --config=configs/grpo.py
    python -m experiments.launch --config=configs/rloo.py

The module-level functions are the method (unit-tested on small arrays in
tests/trainers/test_grpo_parts.py): `init_state`, `make_experience` and `update`;
`train` wires them to the shared RL loop of rl_common, as PPO's does.

One iteration: `prompts_per_iter` prompts, each repeated `group_size` (G)
times as a consecutive block of rows, are sampled with the jitted KV-cache
sampler (every row draws its own tokens). A reward function that runs on the
host (`reward_fn="gold"` or a Python function) decodes the samples between
the sampling and the experience programs. In one jitted function: the
policy's and the reference's log-probs at the sampling temperature, the
reward-model score (read at each response's last token) when
`reward_fn="model"`, the missing-EOS penalty, the KL in the reward when
`kl.mode="reward"`, and the group advantages (`rl.grpo`), broadcast over the
response tokens. Then, in one jitted update, `num_epochs` passes over shuffled
minibatches of the clipped surrogate plus, when `kl.mode="loss"`, coef times
the per-token KL term, aggregated alike. No value network, no Python loop over
tokens and no host round trip inside the update.

`config.advantage` is "grpo" (group mean and std; Dr. GRPO with
`scale_rewards=False`) or "rloo" (leave-one-out mean); the summary's method
is that name. The reference is the SFT policy, frozen twice: no optimizer
state and `stop_gradient` on its log-probs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from rlhf_jax import config_spec as cs
from rlhf_jax import evaluation, exporters, monitor, optim, rng, sharding
from rlhf_jax.models import lora
from rlhf_jax.rl import advantages as adv_lib
from rlhf_jax.rl import grpo as grpo_lib
from rlhf_jax.rl import kl as kl_lib
from rlhf_jax.rl import ppo_losses
from rlhf_jax.rl import sampler as sampler_lib
from rlhf_jax.trainers import common, rl_common

# Metrics that depend on wall-clock time (left out when runs are compared).
TIMING_METRICS = rl_common.TIMING_METRICS

KL_MODES = ("loss", "reward")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = rl_common.LOSS_AGGREGATIONS

HostRewardFn = Callable[[list[str], list[str]], Sequence[float]]


# ------------------------------------------------------------ reward functions


def resolve_reward_fn(config) -> HostRewardFn | None:
  """The host-side reward function `config.reward_fn` names; None for "model".

  "model": the reward stage, scored on device (None here). "gold": the testbed's gold
  reward. "package.module:function": imported, and called as function(prompts: list[str],
  responses: list[str]) -> a float per response.
  """
  name = config.reward_fn
  if name == "model":
    return None
  if name == "gold":
    from rlhf_jax.data import testbed

    tb = config.data.testbed
    return lambda prompts, responses: testbed.gold_rewards(prompts, responses, tb)
  return evaluation.import_function(name, "config.reward_fn")


def host_rewards(fn: HostRewardFn, name: str, prompts: list[str], responses: list[str]):
  """fn(prompts, responses) as [B] float32, checked: one finite float per response."""
  scores = evaluation.host_scores(fn, f"config.reward_fn={name!r}", prompts, responses)
  return scores.astype(np.float32)


def _check_reward_fn(config, prefix: str) -> None:
  try:
    resolve_reward_fn(config)
  except cs.ConfigError as error:
    raise cs.ConfigError(str(error).replace("config.", f"{prefix}.", 1)) from None


def _check_kl(config, prefix: str) -> None:
  if config.kl.mode == "loss" and config.kl.estimator == "k1":
    raise cs.ConfigError(
      f"{prefix}.kl.estimator='k1' with {prefix}.kl.mode='loss': {grpo_lib.K1_LOSS_ERROR}"
    )


def _updates(config) -> int:
  rollout = config.prompts_per_iter * config.group_size
  return rl_common.schedule_steps(config) * config.num_epochs * (rollout // config.minibatch_size)


# One declared check per field of configs/grpo.py and configs/rloo.py (rlhf_jax/config_spec.py).
CONFIG_SPEC = cs.Spec(
  {
    "exporters": exporters.CONFIG_SPEC,
    **cs.RUN_FIELDS,
    **cs.LOOP_FIELDS,
    **rl_common.UPSTREAM_FIELDS,
    **rl_common.REFERENCE_FIELDS,
    **rl_common.CONTINUE_FIELDS,
    # A host reward function needs no reward model: the stage is trained only for "model".
    "reward": cs.Stage(unless="reward_init", when=lambda c: c.reward_fn == "model"),
    **rl_common.SAMPLING_FIELDS,
    **rl_common.OLD_LOGPROBS_FIELDS,
    **rl_common.MISSING_EOS_FIELDS,
    "data": rl_common.PROMPT_DATA_SPEC,
    "prompts_per_iter": cs.Int(min=1),
    "group_size": cs.Int(min=2),
    "reward_fn": cs.Str(nonempty=True),
    "advantage": cs.Choice(*grpo_lib.ADVANTAGE_KINDS),
    "scale_rewards": cs.Bool(),
    "num_epochs": cs.Int(min=1),
    "minibatch_size": cs.Int(min=1),
    "clip_eps": cs.Float(gt=0),
    "loss_aggregation": cs.Choice(*AGGREGATIONS),
    "kl": cs.Spec(
      {
        "mode": cs.Choice(*KL_MODES),
        "estimator": cs.Choice(*KL_ESTIMATORS),
        "coef": cs.Float(min=0),
      }
    ),
    "optim": optim.CONFIG_SPEC,
    "monitor": monitor.CONFIG_SPEC,
    "lora": lora.CONFIG_SPEC,
    "eval": rl_common.EVAL_SPEC,
  },
  checks=(
    rl_common.check_reference,
    rl_common.check_continue,
    cs.divides("minibatch_size", "prompts_per_iter*group_size"),
    _check_kl,
    _check_reward_fn,
    lora.check_no_dropout,
    optim.check_steps("optim", _updates),
    rl_common.check_eval,
    cs.mesh_batch("prompts_per_iter*group_size", "minibatch_size"),
  ),
)


def check_config(config) -> None:
  """Errors naming the field, before any stage trains (the declared CONFIG_SPEC)."""
  CONFIG_SPEC.validate(config)


# ------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings(rl_common.RolloutSettings):
  """The static values GRPO's jitted functions read, from the config (`from_config`)."""

  group_size: int
  advantage: str
  scale_rewards: bool
  kl_in_loss: bool
  kl_estimator: str
  kl_coef: float

  @classmethod
  def from_config(cls, config) -> Settings:
    rollout = config.prompts_per_iter * config.group_size
    return cls(
      **cls.fields(config, epochs=config.num_epochs, rollout_batch_size=rollout),
      group_size=config.group_size,
      advantage=config.advantage,
      scale_rewards=config.scale_rewards,
      kl_in_loss=config.kl.mode == "loss",
      kl_estimator=config.kl.estimator,
      kl_coef=config.kl.coef,
    )


def init_state(policy, key, *, tx):
  """The training state: the policy's params, optimizer state, step and RNG."""
  return dict(policy=policy, policy_opt=tx.init(policy), step=jnp.zeros((), jnp.int32), rng=key)


def logps_fn(module, s: Settings):
  """f(params, full, fmask, response) -> (log-probs at the sampling T, response logits)."""
  return rl_common.response_logps_fn(module, s.prompt_len, s.max_new_tokens, s.temperature)


# ----------------------------------------------------------------- experience


def make_experience(
  state, ref_params, prompt, pmask, sample, host_scores=None, *, module, rm_score, s: Settings
):
  """One rollout's training arrays and statistics, in one program after sampling.

  The scores are the reward model's (`rm_score(full, fmask, rmask)`, read at each
  response's last token) or, from a host reward function, `host_scores` [B]; then the
  missing-EOS penalty, the KL in the reward when the KL is not in the loss, and the group
  advantages broadcast over the response tokens.
  """
  response, rmask = sample.tokens, sample.response_mask
  full = jnp.concatenate([prompt, response], axis=1)
  fmask = jnp.concatenate([pmask, rmask], axis=1)
  logps = logps_fn(module, s)
  if s.old_logprobs == "sampler":
    logp = sample.logprobs
  else:
    logp, _ = logps(state["policy"], full, fmask, response)
  ref_logps = logps
  if ref_params is None:  # LoRA: the reference is the policy's own frozen base, run plain
    ref_params = lora.base(state["policy"])
    ref_logps = logps_fn(module.clone(config=lora.plain(module.config)), s)
  ref_logp = jax.lax.stop_gradient(ref_logps(ref_params, full, fmask, response)[0])
  raw = rm_score(full, fmask, rmask) if host_scores is None else host_scores
  scores = adv_lib.penalize_missing_eos(raw, sample.has_eos, s.missing_eos_score)
  if s.kl_in_loss:
    rewards = scores
    seq_kl = kl_lib.sequence_kl(kl_lib.kl_penalty(logp, ref_logp, "k1", rmask), rmask)
  else:
    rewards, seq_kl = grpo_lib.kl_shaped_rewards(scores, logp, ref_logp, rmask, s.kl_coef)
  advantages = grpo_lib.group_advantages(rewards, s.group_size, s.advantage, scale=s.scale_rewards)
  exp = dict(
    full=full,
    fmask=fmask,
    response=response,
    rmask=rmask,
    old_logp=logp,
    ref_logp=ref_logp,
    advantages=grpo_lib.token_advantages(advantages, rmask),
  )
  lengths = jnp.sum(rmask, axis=-1).astype(jnp.float32)
  stats = {
    "reward": jnp.mean(scores),
    **grpo_lib.group_reward_stats(scores, s.group_size),
    "objective/raw_scores": jnp.mean(raw),
    "objective/kl": jnp.mean(seq_kl),
    "objective/rlhf_reward": jnp.mean(rewards),
    "advantages/abs_mean": jnp.mean(jnp.abs(advantages)),
    "completion_length": jnp.mean(lengths),
    "frac_no_eos": 1.0 - jnp.mean(sample.has_eos.astype(jnp.float32)),
  }
  return exp, stats


# --------------------------------------------------------------------- update


def minibatch_loss(policy, mb, *, module, s: Settings):
  """The clipped surrogate plus, with the KL in the loss, coef x the per-token KL term."""
  logp, resp_logits = logps_fn(module, s)(policy, mb["full"], mb["fmask"], mb["response"])
  mode = s.loss_aggregation
  pg_loss, pg_stats = ppo_losses.policy_loss(
    logp, mb["old_logp"], mb["advantages"], mb["rmask"], clip_eps=s.clip_eps, mode=mode
  )
  kl_term = grpo_lib.kl_loss(
    logp, mb["ref_logp"], mb["rmask"], estimator=s.kl_estimator, mode=mode, as_loss=s.kl_in_loss
  )
  # With the KL in the reward the term is only watched, not optimised.
  loss = pg_loss + s.kl_coef * kl_term if s.kl_in_loss else pg_loss
  entropy = ppo_losses.masked_entropy(
    resp_logits, mb["rmask"], temperature=s.temperature, mode=mode
  )
  stats = {
    "loss/policy": pg_loss,
    "loss/kl": kl_term,
    "loss/total": loss,
    "policy/entropy": entropy,
    **{f"policy/{k}": v for k, v in pg_stats.items()},
  }
  return loss, stats


def update(state, exp, *, module, tx, lr_schedule, s: Settings):
  """`s.epochs` passes of minibatch updates; rows are shuffled across groups (the
  advantages already hold the baseline)."""
  rng, perm_rng = jax.random.split(state["rng"])
  trainable = lora.trainable(module.config)  # LoRA: gradients of the adapters only
  loss_fn = lambda p, mb: minibatch_loss(lora.stop_frozen(p, trainable), mb, module=module, s=s)

  def step(carry, mb):
    policy, policy_opt = carry
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(policy, mb)
    updates, policy_opt = tx.update(grads, policy_opt, policy)
    stats["grad_norm"] = optim.l2_norm(grads)
    stats["policy/update_norm"] = optim.l2_norm(updates)
    return (optax.apply_updates(policy, updates), policy_opt), stats

  (policy, policy_opt), stats = rl_common.scan_minibatches(
    step, (state["policy"], state["policy_opt"]), exp, perm_rng,
    epochs=s.epochs, minibatch_size=s.minibatch_size,
  )  # fmt: skip
  stats["lr"] = lr_schedule(state["step"] * s.updates_per_iteration)
  stats["policy/param_norm"] = optim.l2_norm(policy)
  new = dict(state, policy=policy, policy_opt=policy_opt, rng=rng, step=state["step"] + 1)
  return new, stats


class Programs(NamedTuple):
  """One GRPO/RLOO iteration's jitted programs, laid out as `train` lays them out."""

  sample: Callable  # (params, prompt, pmask, key) -> SampleOutput
  experience: Callable  # (state, ref params, prompt, pmask, sample, *host scores) -> (exp, stats)
  update: Callable  # (state, exp) -> (state, stats); donates the state


def make_programs(
  module, sample_fn, rm_score, state_sh, ref_sh, mesh, *, tx, lr_schedule, s: Settings
) -> Programs:
  """Jits `make_experience` and `update` for the state's shardings `state_sh`. `rm_score`
  None: the scores come from the host (`iteration`'s `score_on_host`), sharded by row."""
  rep = common.replicated(mesh)
  batch_sh, vec_sh = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
  sample_sh = sampler_lib.output_shardings(mesh)
  host_sh = () if rm_score is not None else (vec_sh,)
  experience = jax.jit(
    functools.partial(make_experience, module=module, rm_score=rm_score, s=s),
    in_shardings=(state_sh, ref_sh, batch_sh, batch_sh, sample_sh, *host_sh),
  )
  update_fn = jax.jit(
    functools.partial(update, module=module, tx=tx, lr_schedule=lr_schedule, s=s),
    in_shardings=(state_sh, None),
    out_shardings=(state_sh, rep),
    donate_argnums=(0,),
  )
  return Programs(sample_fn, experience, update_fn)


def iteration(
  programs: Programs, state, ref_params, prompt, pmask, key, score_on_host=None, phases=None
):
  """One iteration: sample, score, make the group-baseline experience, update.

  On device throughout, except `score_on_host(prompt, sample)` for a host reward: the rows
  go to the host to be scored there and it returns the [B] scores on the mesh, by row.
  Call it under the mesh with the prompts on it; `phases` sees each program's output (the
  phase clock of log steps). Returns the new state and the statistics, still on device.
  """
  phases = phases or (lambda out: out)
  sample = phases(programs.sample(state["policy"], prompt, pmask, key))
  scores = score_on_host(prompt, sample) if score_on_host else ()
  exp, exp_stats = phases(programs.experience(state, ref_params, prompt, pmask, sample, *scores))
  state, upd_stats = phases(programs.update(state, exp))
  return state, {**exp_stats, **upd_stats}


def flops_per_iteration(model_config, s: Settings, rm_ensemble: int) -> float:
  """Policy forward-backward per epoch; forwards of the old policy, reference and RM."""
  seq = s.prompt_len + s.max_new_tokens
  per_seq = seq * model_config.train_flops_per_token(seq)
  return s.rollout_batch_size * per_seq * (s.epochs + (2 + rm_ensemble) / 3)


# ---------------------------------------------------------------------- train


def train(config: Any, workdir: str) -> dict[str, float]:
  """Runs GRPO or RLOO; returns the final eval metrics and writes `<workdir>/summary.json`."""
  check_config(config)
  s = Settings.from_config(config)
  reward_fn = resolve_reward_fn(config)
  tx, lr_schedule = optim.make_optimizer(
    config.optim,
    rl_common.schedule_steps(config) * s.updates_per_iteration,
    trainable=lora.trainable(config.lora.rank),  # LoRA: only the adapters train
  )
  # A host reward needs no reward model; one given is still loaded for the eval's proxy.
  run = rl_common.start(
    config,
    workdir,
    batch_size=config.prompts_per_iter,
    batch_key="config.prompts_per_iter",
    reward=reward_fn is None,
  )
  with run:  # closes the checkpointer and the metric writer on the way out
    mesh, rules, sft, rm, tok = run.mesh, run.rules, run.sft, run.rm, run.sft.tokenizer
    # The policy trained: the SFT policy, or it with fresh LoRA adapters, whose base then is
    # the reference too (one copy: `rl_common.LoraPolicy`).
    adapted = None
    if config.lora.rank:
      adapted = rl_common.LoraPolicy(sft, config.lora, config.seed, mesh, rules)
    policy = adapted.policy if adapted else sft

    # ------------------------------------------------ state, jitted programs
    init = functools.partial(init_state, tx=tx)
    key = rng.key(config.seed, "init")
    abstract = jax.eval_shape(init, policy.params, key)
    rep = common.replicated(mesh)
    opt_sh = common.mirror_shardings(
      abstract["policy_opt"], abstract["policy"], policy.shardings, mesh
    )
    state_sh = dict(policy=policy.shardings, policy_opt=opt_sh, step=rep, rng=rep)
    sample_fn = rl_common.sampler(policy, config, mesh, rules)
    rm_score = rl_common.rm_score_fn(rm, s.prompt_len) if reward_fn is None else None
    ref = run.reference  # the KL reference: sft, unless config.reference_init
    ref_sh = None if adapted else ref.shardings  # LoRA: the reference is in the state
    programs = make_programs(
      policy.module, sample_fn, rm_score, state_sh, ref_sh, mesh, tx=tx,
      lr_schedule=lr_schedule, s=s,
    )  # fmt: skip

    def score_on_host(prompt, sample) -> tuple[jax.Array, ...]:
      """The host reward of this rollout as a sharded [B] array."""
      prompts = tok.decode_batch(sharding.fetch(prompt))
      responses = tok.decode_batch(sharding.fetch(sample.tokens))
      scores = host_rewards(reward_fn, config.reward_fn, prompts, responses)
      return (sharding.global_from_full(scores, mesh),)

    # With LoRA the SFT parameters are given to the state (donated) and then released.
    donate = (0,) if adapted else ()
    state, clock = common.restore_or_init(
      run,
      common.with_shardings(abstract, state_sh),
      lambda: jax.jit(init, out_shardings=state_sh, donate_argnums=donate)(policy.params, key),
    )
    reference = ref
    if adapted:
      adapted.release(sft)
      reference = adapted.reference_view(lambda: state["policy"])

    # ------------------------------------------------------ evaluator, loop
    evaluate = rl_common.make_evaluator(
      config, workdir, run.prompt_set.eval, sft=reference, rm=rm, sample_fn=sample_fn,
      logps_fn=logps_fn(policy.module, s), mesh=mesh, rules=rules, proxy_host=reward_fn,
      start_step=run.start_step, exporter=run.writer.exporter, model_config=policy.module.config,
    )  # fmt: skip
    ensemble = rm.ensemble_size if reward_fn is None else 0
    loop = common.bookkeeping(
      run,
      flops_per_step=flops_per_iteration(sft.module.config, s, ensemble),
      dtype=sft.module.config.dtype,
      metric_keys=("reward", "objective/kl", "eval/gold_reward"),
    )
    common.evaluate_start(run, lambda: evaluate(state["policy"], run.start_step))
    rollout_key = rng.key(config.seed, "rollout")
    tokens = float(s.rollout_batch_size * (s.prompt_len + s.max_new_tokens))
    step = run.start_step
    while step < config.total_steps and rl_common.stopped_by_alert(evaluate) is None:
      batch = next(run.loader)
      # Prompt i fills rows [i * G, (i + 1) * G): the groups the baseline is taken over.
      batch = jax.tree.map(lambda x: np.repeat(x, s.group_size, axis=0), batch)
      phases = rl_common.PhaseClock((step + 1) % config.log_every == 0, state)
      with sharding.use_mesh(mesh, rules):
        prompt = sharding.host_to_global(batch["tokens"], mesh)
        pmask = sharding.host_to_global(batch["mask"], mesh)
        key = jax.random.fold_in(rollout_key, step)
        state, stats = iteration(
          programs, state, ref.params, prompt, pmask, key,
          score_on_host if reward_fn is not None else None, phases,
        )  # fmt: skip
      step += 1
      preempted = run.ckpt.preemption_requested(step)
      stats = {**stats, **phases.metrics()}
      loop.after_update(
        step, stats, tokens, lambda: evaluate(state["policy"], step), preempted=preempted
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
    params=lambda: state["policy"],
    evaluate=evaluate,
    method=config.advantage,
    clock=clock,
    evaluator=evaluate.judge.name,
    model_config=policy.module.config,
    tokenizer_file=sft.tokenizer.filename,
    summary={
      "kl_coef": float(config.kl.coef),
      "kl_mode": config.kl.mode,
      "group_size": s.group_size,
      "reward_fn": config.reward_fn,
    },
    watch=evaluate.watch,
  )
