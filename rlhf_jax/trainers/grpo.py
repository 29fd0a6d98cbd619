"""GRPO and RLOO: a group baseline instead of a critic, KL to the frozen SFT reference.

    python -m experiments.launch --config=configs/grpo.py
    python -m experiments.launch --config=configs/rloo.py

Sections, in order: logging and config checks, mesh, upstream stages (SFT,
reward model), reward function, sharded state, sampler, experience, update,
checkpoint restore, evaluator, train loop, summary.

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

import importlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from rlhf_jax import checkpoint, metrics, optim, sharding, stages
from rlhf_jax import config_spec as cs
from rlhf_jax.rl import advantages as adv_lib
from rlhf_jax.rl import grpo as grpo_lib
from rlhf_jax.rl import kl as kl_lib
from rlhf_jax.rl import ppo_losses
from rlhf_jax.rl import sampler as sampler_lib
from rlhf_jax.trainers import common, rl_common

TIMING_METRICS = (
  "tokens_per_s",
  "steps_per_s",
  "mfu",
  "time/rollout_s",
  "time/scoring_s",
  "time/update_s",
  "time/generation_fraction",
)

KL_MODES = ("loss", "reward")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = rl_common.LOSS_AGGREGATIONS

HostRewardFn = Callable[[list[str], list[str]], Sequence[float]]


# ------------------------------------------------------------ reward functions


def resolve_reward_fn(config) -> HostRewardFn | None:
  """The host-side reward function `config.reward_fn` names; None for "model".

  "model": the reward stage, scored on device (None here). "gold": the
  testbed's gold reward. "package.module:function": imported, and called as
  function(prompts: list[str], responses: list[str]) -> a float per response.
  """
  name = config.reward_fn
  if name == "model":
    return None
  if name == "gold":
    from rlhf_jax.data import testbed

    tb = config.data.testbed
    return lambda prompts, responses: testbed.gold_rewards(prompts, responses, tb)
  if not isinstance(name, str) or name.count(":") != 1:
    raise ValueError(
      f"config.reward_fn={name!r}: expected 'model', 'gold' or 'package.module:function'."
    )
  module_name, _, attr = name.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as error:
    raise ValueError(
      f"config.reward_fn={name!r}: cannot import {module_name!r} ({error})."
    ) from None
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise ValueError(f"config.reward_fn={name!r}: {module_name} has no function {attr!r}.")
  return fn


def host_rewards(fn: HostRewardFn, name: str, prompts: list[str], responses: list[str]):
  """fn(prompts, responses) as [B] float32, checked: one finite float per response."""
  out = fn(prompts, responses)
  try:
    scores = np.asarray(out, dtype=np.float32)
  except (TypeError, ValueError) as error:
    raise ValueError(f"config.reward_fn={name!r} returned {out!r}, not floats: {error}") from None
  if scores.shape != (len(responses),):
    raise ValueError(
      f"config.reward_fn={name!r} returned shape {scores.shape} for {len(responses)} responses; "
      "expected one float per response."
    )
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"config.reward_fn={name!r} returned non-finite rewards: {scores}.")
  return scores


def _check_reward_fn(config, prefix: str) -> None:
  try:
    resolve_reward_fn(config)
  except ValueError as error:
    raise cs.ConfigError(str(error).replace("config.", f"{prefix}.", 1)) from None


def _check_kl(config, prefix: str) -> None:
  if config.kl.mode == "loss" and config.kl.estimator == "k1":
    raise cs.ConfigError(
      f"{prefix}.kl.estimator='k1' with {prefix}.kl.mode='loss': {grpo_lib.K1_LOSS_ERROR}"
    )


def _updates(config) -> int:
  rollout = config.prompts_per_iter * config.group_size
  return config.total_steps * config.num_epochs * (rollout // config.minibatch_size)


# One declared check per field of configs/grpo.py and configs/rloo.py (rlhf_jax/config_spec.py).
CONFIG_SPEC = cs.Spec(
  {
    **cs.RUN_FIELDS,
    **cs.LOOP_FIELDS,
    **rl_common.UPSTREAM_FIELDS,
    # A host reward function needs no reward model: the stage is trained only for "model".
    "reward": cs.Stage(unless="reward_init", when=lambda c: c.reward_fn == "model"),
    **rl_common.SAMPLING_FIELDS,
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
    "eval": rl_common.EVAL_SPEC,
  },
  checks=(
    cs.divides("minibatch_size", "prompts_per_iter*group_size"),
    _check_kl,
    _check_reward_fn,
    optim.check_steps("optim", _updates),
    cs.mesh_batch("prompts_per_iter*group_size", "minibatch_size"),
  ),
)


def check_config(config) -> None:
  """Errors naming the field, before any stage trains (the declared CONFIG_SPEC)."""
  CONFIG_SPEC.validate(config)


# ---------------------------------------------------------------------- train


def train(config: Any, workdir: str) -> dict[str, float]:
  """Runs GRPO or RLOO; returns the final eval metrics and writes `<workdir>/summary.json`."""
  # ------------------------------------------------------- logging, checks
  os.makedirs(workdir, exist_ok=True)
  is_primary = jax.process_index() == 0
  check_config(config)
  group_size = config.group_size
  rollout_batch = config.prompts_per_iter * group_size
  num_minibatches = rollout_batch // config.minibatch_size
  updates_per_iter = config.num_epochs * num_minibatches
  reward_fn = resolve_reward_fn(config)
  kl_in_loss = config.kl.mode == "loss"
  # Config errors surface before any stage trains.
  tx, lr_schedule = optim.make_optimizer(config.optim, config.total_steps * updates_per_iter)

  # -------------------------------------------------------------------- mesh
  mesh = common.mesh_from_config(config)
  rules = config.sharding_rules

  # -------------------------------------------------------- upstream stages
  # A host-side reward needs no reward model; one given is still loaded for the
  # eval's proxy reward.
  if reward_fn is None or config.reward_init:
    sft_dir, reward_dir = rl_common.ensure_stages(config, workdir)
  else:
    sft_dir, reward_dir = rl_common.ensure_sft(config, workdir), None
  clock_start = time.perf_counter()
  sft = stages.load_policy(sft_dir, mesh, rules)
  rm = stages.load_reward_model(reward_dir, mesh, rules) if reward_dir else None
  tok = sft.tokenizer
  if is_primary:
    tok.save(os.path.join(workdir, "tokenizer.model"))
  module = sft.module
  temperature = config.temperature
  p_len, n_new = config.prompt_len, config.max_new_tokens

  ckpt = checkpoint.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=config.keep_checkpoints,
    save_interval_steps=config.checkpoint_every,
  )
  start_step = ckpt.latest_intact_step() or 0
  writer = metrics.MetricWriter(workdir, resume_step=start_step or -1)
  prompt_loader = rl_common.prompt_loader(config, tok, config.prompts_per_iter)

  # ------------------------------------------------------- sharded state
  def init_state(policy_params, rng):
    return dict(
      policy=policy_params,
      policy_opt=tx.init(policy_params),
      step=jnp.zeros((), jnp.int32),
      rng=rng,
    )

  abstract = jax.eval_shape(init_state, sft.params, jax.random.key(config.seed))
  rep = common.replicated(mesh)
  state_sh = dict(
    policy=sft.shardings,
    policy_opt=common.mirror_shardings(
      abstract["policy_opt"], abstract["policy"], sft.shardings, mesh
    ),
    step=rep,
    rng=rep,
  )
  abstract_state = common.with_shardings(abstract, state_sh)

  # --------------------------------------------------------------- sampler
  sample_fn = rl_common.policy_sampler(module, sft, config, mesh, rules)

  # ------------------------------------------------------------ experience
  # Log-probs of the response tokens at the sampling temperature, from the
  # positions that predict them; the same function serves policy and reference.
  logps = rl_common.response_logps_fn(module, p_len, n_new, temperature)
  rm_score = rl_common.rm_score_fn(rm, p_len) if reward_fn is None else None
  missing_eos_score = config.missing_eos_score if config.missing_eos_penalty else None

  def make_experience(state, prompt, pmask, sample, host_scores=None):
    """Rollout arrays for the update, and their statistics; host_scores [B] or None."""
    response, rmask = sample.tokens, sample.response_mask
    full = jnp.concatenate([prompt, response], axis=1)
    fmask = jnp.concatenate([pmask, rmask], axis=1)
    logp, _ = logps(state["policy"], full, fmask, response)
    ref_logp, _ = logps(sft.params, full, fmask, response)
    ref_logp = jax.lax.stop_gradient(ref_logp)
    raw = rm_score(full, fmask, rmask) if host_scores is None else host_scores
    scores = adv_lib.penalize_missing_eos(raw, sample.has_eos, missing_eos_score)
    if kl_in_loss:
      rewards = scores
      seq_kl = kl_lib.sequence_kl(kl_lib.kl_penalty(logp, ref_logp, "k1", rmask), rmask)
    else:
      rewards, seq_kl = grpo_lib.kl_shaped_rewards(scores, logp, ref_logp, rmask, config.kl.coef)
    advantages = grpo_lib.group_advantages(
      rewards, group_size, config.advantage, scale=config.scale_rewards
    )
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
      **grpo_lib.group_reward_stats(scores, group_size),
      "objective/raw_scores": jnp.mean(raw),
      "objective/kl": jnp.mean(seq_kl),
      "objective/rlhf_reward": jnp.mean(rewards),
      "advantages/abs_mean": jnp.mean(jnp.abs(advantages)),
      "completion_length": jnp.mean(lengths),
      "frac_no_eos": 1.0 - jnp.mean(sample.has_eos.astype(jnp.float32)),
    }
    return exp, stats

  # ---------------------------------------------------------------- update
  def minibatch_loss(policy_params, mb):
    logp, resp_logits = logps(policy_params, mb["full"], mb["fmask"], mb["response"])
    pg_loss, pg_stats = ppo_losses.policy_loss(
      logp,
      mb["old_logp"],
      mb["advantages"],
      mb["rmask"],
      clip_eps=config.clip_eps,
      mode=config.loss_aggregation,
    )
    kl_term = grpo_lib.kl_loss(
      logp,
      mb["ref_logp"],
      mb["rmask"],
      estimator=config.kl.estimator,
      mode=config.loss_aggregation,
      as_loss=kl_in_loss,
    )
    # With the KL in the reward the term is only watched, not optimised.
    loss = pg_loss + config.kl.coef * kl_term if kl_in_loss else pg_loss
    entropy = ppo_losses.masked_entropy(
      resp_logits, mb["rmask"], temperature=temperature, mode=config.loss_aggregation
    )
    stats = {
      "loss/policy": pg_loss,
      "loss/kl": kl_term,
      "loss/total": loss,
      "policy/entropy": entropy,
      **{f"policy/{k}": v for k, v in pg_stats.items()},
    }
    return loss, stats

  def update(state, exp):
    rng, perm_rng = jax.random.split(state["rng"])

    def one_minibatch(carry, index):
      policy, policy_opt = carry
      mb = jax.tree.map(lambda x: jnp.take(x, index, axis=0), exp)
      (_, stats), grads = jax.value_and_grad(minibatch_loss, has_aux=True)(policy, mb)
      updates, policy_opt = tx.update(grads, policy_opt, policy)
      stats["grad_norm"] = optim.l2_norm(grads)
      stats["policy/update_norm"] = optim.l2_norm(updates)
      return (optax.apply_updates(policy, updates), policy_opt), stats

    # Rows are shuffled across groups: the advantages already hold the baseline.
    perms = jax.vmap(lambda k: jax.random.permutation(k, rollout_batch))(
      jax.random.split(perm_rng, config.num_epochs)
    )
    indices = perms.reshape(updates_per_iter, config.minibatch_size)
    carry = (state["policy"], state["policy_opt"])
    (policy, policy_opt), stats = jax.lax.scan(one_minibatch, carry, indices)
    stats = jax.tree.map(jnp.mean, stats)
    stats["lr"] = lr_schedule(state["step"] * updates_per_iter)
    stats["policy/param_norm"] = optim.l2_norm(policy)
    new = dict(state, policy=policy, policy_opt=policy_opt, rng=rng, step=state["step"] + 1)
    return new, stats

  # Two programs, so the time of each phase can be measured; the experience
  # stays on device between them.
  batch_sh = sharding.batch_sharding(mesh, 2)
  vec_sh = sharding.batch_sharding(mesh, 1)
  sample_sh = sampler_lib.SampleOutput(batch_sh, batch_sh, batch_sh, batch_sh, vec_sh, vec_sh)
  host_sh = () if reward_fn is None else (vec_sh,)
  experience_fn = jax.jit(
    make_experience, in_shardings=(state_sh, batch_sh, batch_sh, sample_sh, *host_sh)
  )
  update_fn = jax.jit(
    update, in_shardings=(state_sh, None), out_shardings=(state_sh, rep), donate_argnums=(0,)
  )

  def score_on_host(prompt, sample) -> tuple[jax.Array, ...]:
    """The host reward of this rollout as a sharded [B] array (nothing for "model")."""
    if reward_fn is None:
      return ()
    prompts = tok.decode_batch(sharding.fetch(prompt))
    responses = tok.decode_batch(sharding.fetch(sample.tokens))
    scores = host_rewards(reward_fn, config.reward_fn, prompts, responses)
    return (sharding.global_from_full(scores, mesh),)

  # ------------------------------------------------------ load checkpoint
  previous_time = 0.0
  with sharding.use_mesh(mesh, rules):
    if start_step:
      state, meta = ckpt.restore(start_step, target=abstract_state)
      prompt_loader.set_state(meta["loader"])
      previous_time = float(meta.get("wall_time_s", 0.0))
      logging.info("Resumed from iteration %d", start_step)
    else:
      init = jax.jit(init_state, out_shardings=state_sh)
      state = init(sft.params, jax.random.key(config.seed))
  ckpt.install_sigterm_handler()
  stage_clock = rl_common.StageClock(previous_time, start=clock_start)

  # ------------------------------------------------------------- evaluator
  evaluate = rl_common.Evaluator(
    config, workdir, sft=sft, rm=rm, sample_fn=sample_fn, logps_fn=logps, mesh=mesh, rules=rules
  )

  # ----------------------------------------------------------- train loop
  progress = metrics.ProgressLogger(
    config.total_steps,
    every_n_steps=config.log_every,
    start_step=start_step,
    metric_keys=("reward", "objective/kl", "eval/gold_reward"),
  )
  cfg_model = module.config
  seq = p_len + n_new
  per_seq = seq * cfg_model.train_flops_per_token(seq)
  # Policy forward-backward per epoch; forwards of the old policy, reference and RM.
  forwards = 2 + (rm.ensemble_size if reward_fn is None else 0)
  flops = rollout_batch * per_seq * (config.num_epochs + forwards / 3)
  loop = common.LoopBookkeeping(
    config, writer=writer, progress=progress, mesh=mesh, flops_per_step=flops, dtype=cfg_model.dtype
  )
  if start_step == 0:
    first = evaluate(state["policy"], 0)
    metrics.check_finite(0, first, context="eval")
    writer.write(0, first)
  step = start_step
  try:
    while step < config.total_steps:
      batch = next(prompt_loader)
      # Prompt i fills rows [i * G, (i + 1) * G): the groups the baseline is taken over.
      batch = jax.tree.map(lambda x: np.repeat(x, group_size, axis=0), batch)
      rollout_rng = jax.random.fold_in(jax.random.key(config.seed + 7), step)
      with sharding.use_mesh(mesh, rules):
        prompt = sharding.host_to_global(batch["tokens"], mesh)
        pmask = sharding.host_to_global(batch["mask"], mesh)
        # Phase times are measured on log steps only (blocking elsewhere would
        # stop the host from running ahead of the device).
        timed = (step + 1) % config.log_every == 0
        if timed:  # the host runs ahead of the device: drain earlier iterations first
          jax.block_until_ready(state)
        clock = [time.perf_counter()]
        sample = rl_common.timed(
          sample_fn(state["policy"], prompt, pmask, rollout_rng), timed, clock
        )
        scores = score_on_host(prompt, sample)
        exp, exp_stats = rl_common.timed(
          experience_fn(state, prompt, pmask, sample, *scores), timed, clock
        )
        state, upd_stats = rl_common.timed(update_fn(state, exp), timed, clock)
      stats = {**exp_stats, **upd_stats}
      if timed:
        phases = np.diff(clock)
        stats.update(
          {
            "time/rollout_s": phases[0],
            "time/scoring_s": phases[1],
            "time/update_s": phases[2],
            "time/generation_fraction": phases[0] / phases.sum(),
          }
        )
      step += 1
      preempted = ckpt.preemption_requested(step)
      tokens = float(rollout_batch * seq)
      loop.after_update(
        step, stats, tokens, lambda: evaluate(state["policy"], step), preempted=preempted
      )
      if loop.should_save:
        meta = {"loader": prompt_loader.get_state(), "wall_time_s": stage_clock.elapsed()}
        ckpt.save(step, state, meta, force=True)
      if preempted:
        logging.warning("SIGTERM: saved iteration %d and stopping; rerun to resume.", step)
        break
  finally:
    common.close_all(ckpt.wait, ckpt.close, writer.close)

  # --------------------------------------------------------------- summary
  if step >= config.total_steps:
    exported = not stages.needs_export(workdir, step)
    if not exported:
      # The loop's last eval (recomputed if the run stopped after its final checkpoint).
      loop.final_eval(start_step, lambda: evaluate(state["policy"], step))
    rl_common.write_summary(
      workdir,
      config.advantage,
      stage_clock.elapsed(),
      kl_coef=float(config.kl.coef),
      kl_mode=config.kl.mode,
      group_size=group_size,
      reward_fn=config.reward_fn,
    )
    if not exported:
      stages.export(
        workdir,
        state["policy"],
        {
          "kind": "policy",
          "model": cfg_model.to_dict(),
          "tokenizer": "tokenizer.model",
          "step": step,
          "eval": loop.last_eval,
        },
      )
  return loop.last_eval
