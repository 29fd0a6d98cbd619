"""PPO against a reward model, with a KL penalty to the frozen SFT reference.

    python -m experiments.launch --config=configs/ppo.py

Sections, in order: logging, mesh, upstream stages (SFT, reward model),
networks and optimizers, sharded state, experience, update, checkpoint
restore, evaluator, train loop, summary.

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

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from rlhf_jax import checkpoint, metrics, models, optim, sharding, stages
from rlhf_jax import config_spec as cs
from rlhf_jax.rl import advantages as adv_lib
from rlhf_jax.rl import kl as kl_lib
from rlhf_jax.rl import ppo_losses
from rlhf_jax.rl import sampler as sampler_lib
from rlhf_jax.rl.logprobs import entropy_from_logits, token_logprobs
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

VALUE_MODELS = ("separate", "policy_head")


def _updates(config) -> int:
  """Optimizer updates in the run: iterations x epochs x minibatches."""
  return (
    config.total_steps * config.ppo_epochs * (config.rollout_batch_size // config.minibatch_size)
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


# One declared check per field of configs/ppo.py (see rlhf_jax/config_spec.py).
CONFIG_SPEC = cs.Spec(
  {
    **cs.RUN_FIELDS,
    **cs.LOOP_FIELDS,
    **rl_common.UPSTREAM_FIELDS,
    **rl_common.SAMPLING_FIELDS,
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
    "value_optim": optim.CONFIG_SPEC,
    "eval": rl_common.EVAL_SPEC,
  },
  checks=(
    cs.divides("minibatch_size", "rollout_batch_size"),
    check_kl_controller,
    optim.check_steps("optim", _updates),
    optim.check_steps("value_optim", _updates),
    cs.mesh_batch("rollout_batch_size", "minibatch_size"),
  ),
)

# Kept for callers of the PPO module; the shared implementation lives in rl_common.
ensure_stages = rl_common.ensure_stages


# ---------------------------------------------------------------------- train


def train(config: Any, workdir: str) -> dict[str, float]:
  """Runs PPO; returns the final eval metrics and writes `<workdir>/summary.json`."""
  # ----------------------------------------------------------------- logging
  CONFIG_SPEC.validate(config)  # before anything is written or any stage trains
  os.makedirs(workdir, exist_ok=True)
  is_primary = jax.process_index() == 0
  rollout_batch = config.rollout_batch_size
  num_minibatches = rollout_batch // config.minibatch_size
  head = config.value_model == "policy_head"
  updates_per_iter = config.ppo_epochs * num_minibatches
  # Config errors surface before any stage trains.
  policy_tx, policy_lr = optim.make_optimizer(config.optim, config.total_steps * updates_per_iter)
  value_tx, _ = optim.make_optimizer(config.value_optim, config.total_steps * updates_per_iter)

  # -------------------------------------------------------------------- mesh
  mesh = common.mesh_from_config(config)
  rules = config.sharding_rules

  # -------------------------------------------------------- upstream stages
  sft_dir, reward_dir = rl_common.ensure_stages(config, workdir)
  clock_start = time.perf_counter()
  sft = stages.load_policy(sft_dir, mesh, rules)
  rm = stages.load_reward_model(reward_dir, mesh, rules)
  tok = sft.tokenizer
  if is_primary:
    tok.save(os.path.join(workdir, "tokenizer.model"))
  lm_module = sft.module  # the policy as a language model: sampling and log-probs
  temperature = config.temperature
  p_len, n_new = config.prompt_len, config.max_new_tokens

  ckpt = checkpoint.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=config.keep_checkpoints,
    save_interval_steps=config.checkpoint_every,
  )
  start_step = ckpt.latest_intact_step() or 0
  writer = metrics.MetricWriter(workdir, resume_step=start_step or -1)
  prompt_loader = rl_common.prompt_loader(config, tok, rollout_batch)

  # ------------------------------------------------ networks and their init
  if head:
    # The value head joins the policy's params as a "value" subtree; the critic
    # slot of the state stays empty.
    policy_module = models.LanguageModel(lm_module.config, value_head=True)
    boxed = jax.eval_shape(lambda: models.init_params(policy_module, jax.random.key(0)))
    head_shapes = sharding.unbox(boxed["value"])
    head_sh = sharding.tree_shardings(
      head_shapes, sharding.logical_specs(boxed["value"]), mesh, rules
    )
    head_init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), head_shapes)
    policy_init = {**sft.params, "value": head_init}
    policy_sh = {**sft.shardings, "value": head_sh}
    value_init, value_sh = {}, {}
  else:
    policy_module = lm_module
    value_module = models.ScalarModel(rm.module.config, head_init="zeros")
    policy_init, policy_sh = sft.params, sft.shardings
    value_init = jax.tree.map(lambda x: x[0], rm.params)  # reward member 0: trunk and head
    value_sh = jax.tree.map(lambda s: rl_common.drop_leading(s, mesh), rm.shardings)

  def lm_params(policy):
    """The language-model part of the policy's params (what the sampler and the evals see)."""
    return {k: v for k, v in policy.items() if k != "value"} if head else policy

  # ------------------------------------------------------- sharded state
  def init_state(policy_params, value_params, rng):
    return dict(
      policy=policy_params,
      value=value_params,
      policy_opt=policy_tx.init(policy_params),
      value_opt=value_tx.init(value_params),
      kl=kl_lib.init_kl_controller(config.kl.init_coef),
      step=jnp.zeros((), jnp.int32),
      rng=rng,
    )

  abstract = jax.eval_shape(init_state, policy_init, value_init, jax.random.key(config.seed))
  rep = common.replicated(mesh)
  state_sh = dict(
    policy=policy_sh,
    value=value_sh,
    policy_opt=common.mirror_shardings(abstract["policy_opt"], abstract["policy"], policy_sh, mesh),
    value_opt=common.mirror_shardings(abstract["value_opt"], abstract["value"], value_sh, mesh),
    kl=jax.tree.map(lambda _: rep, abstract["kl"]),
    step=rep,
    rng=rep,
  )
  abstract_state = common.with_shardings(abstract, state_sh)

  # --------------------------------------------------------------- sampler
  sample_fn = rl_common.policy_sampler(lm_module, sft, config, mesh, rules)

  # ------------------------------------------------------------ experience
  ref_logps = rl_common.response_logps_fn(lm_module, p_len, n_new, temperature)
  rm_score = rl_common.rm_score_fn(rm, p_len)

  def forward(policy, value, full, fmask, response):
    """Log-probs [B, N] at the sampling T, response logits, and V(s_t) [B, N].

    V(s_t) is read at the position that predicts response token t, i.e. the
    value of the state before that token.
    """
    positions = models.positions_from_mask(fmask)
    attn = models.causal_attention_mask(fmask)
    if head:
      logits, _, values = policy_module.apply({"params": policy}, full, positions, attn)
    else:
      logits, _ = policy_module.apply({"params": policy}, full, positions, attn)
      values = value_module.apply({"params": value}, full, positions, attn)
    window = slice(p_len - 1, p_len + n_new - 1)
    resp_logits = logits[:, window]
    return token_logprobs(resp_logits, response, temperature), resp_logits, values[:, window]

  def make_experience(state, prompt, pmask, sample):
    response, rmask = sample.tokens, sample.response_mask
    full = jnp.concatenate([prompt, response], axis=1)
    fmask = jnp.concatenate([pmask, rmask], axis=1)
    logp, resp_logits, values = forward(state["policy"], state["value"], full, fmask, response)
    ref_logp, _ = ref_logps(sft.params, full, fmask, response)
    ref_logp = jax.lax.stop_gradient(ref_logp)
    scores = rm_score(full, fmask, rmask)
    kl = kl_lib.kl_penalty(logp, ref_logp, config.kl.estimator, rmask)
    rewards, non_score, used_scores = adv_lib.assemble_rewards(
      scores,
      kl,
      rmask,
      state["kl"].kl_coef,
      has_eos=sample.has_eos,
      missing_eos_score=config.missing_eos_score if config.missing_eos_penalty else None,
    )
    if config.whiten_rewards:
      rewards = adv_lib.whiten(rewards, rmask, shift_mean=False)
    advantages, returns = adv_lib.gae(rewards, values, rmask, config.gamma, config.lam)
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
      "objective/entropy": jnp.sum(entropy_from_logits(resp_logits, temperature) * rmask)
      / jnp.maximum(rmask.shape[0], 1),
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

  # ---------------------------------------------------------------- update
  def minibatch_loss(policy_params, value_params, mb):
    logp, resp_logits, vpred = forward(
      policy_params, value_params, mb["full"], mb["fmask"], mb["response"]
    )
    pg_loss, pg_stats = ppo_losses.policy_loss(
      logp,
      mb["old_logp"],
      mb["advantages"],
      mb["rmask"],
      clip_eps=config.clip_eps,
      mode=config.loss_aggregation,
    )
    vf_loss, vf_stats = ppo_losses.value_loss(
      vpred,
      mb["old_values"],
      mb["returns"],
      mb["rmask"],
      clip_eps=config.value_clip_eps,
      mode=config.loss_aggregation,
    )
    entropy = ppo_losses.masked_entropy(
      resp_logits, mb["rmask"], temperature=temperature, mode=config.loss_aggregation
    )
    loss = pg_loss + config.vf_coef * vf_loss
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
    return loss, stats

  def ppo_update(state, exp):
    rng, perm_rng = jax.random.split(state["rng"])

    def one_minibatch(carry, index):
      policy, value, policy_opt, value_opt = carry
      mb = jax.tree.map(lambda x: jnp.take(x, index, axis=0), exp)
      (_, stats), (g_policy, g_value) = jax.value_and_grad(
        minibatch_loss, argnums=(0, 1), has_aux=True
      )(policy, value, mb)
      u_policy, policy_opt = policy_tx.update(g_policy, policy_opt, policy)
      u_value, value_opt = value_tx.update(g_value, value_opt, value)
      stats["policy/grad_norm"] = optim.l2_norm(g_policy)
      stats["policy/update_norm"] = optim.l2_norm(u_policy)
      if head:
        stats["val/grad_norm"] = optim.l2_norm(g_policy["value"])
      else:
        stats["val/grad_norm"] = optim.l2_norm(g_value)
      new = (
        optax.apply_updates(policy, u_policy),
        optax.apply_updates(value, u_value),
        policy_opt,
        value_opt,
      )
      return new, stats

    perms = jax.vmap(lambda k: jax.random.permutation(k, rollout_batch))(
      jax.random.split(perm_rng, config.ppo_epochs)
    )
    indices = perms.reshape(updates_per_iter, config.minibatch_size)
    carry = (state["policy"], state["value"], state["policy_opt"], state["value_opt"])
    (policy, value, policy_opt, value_opt), stats = jax.lax.scan(one_minibatch, carry, indices)
    stats = jax.tree.map(jnp.mean, stats)
    stats["lr"] = policy_lr(state["step"] * updates_per_iter)
    stats["policy/param_norm"] = optim.l2_norm(lm_params(policy))
    return dict(
      state, policy=policy, value=value, policy_opt=policy_opt, value_opt=value_opt, rng=rng
    ), stats

  def update_and_control(state, exp, kl):
    state, upd_stats = ppo_update(state, exp)
    kl_state = kl_lib.update_kl_controller(
      state["kl"],
      kl,
      rollout_batch,
      kind=config.kl.controller,
      target=config.kl.target,
      horizon=config.kl.horizon,
    )
    return dict(state, kl=kl_state, step=state["step"] + 1), upd_stats

  # Two programs, so the time of each phase can be measured; the experience
  # stays on device between them.
  batch_sh = sharding.batch_sharding(mesh, 2)
  vec_sh = sharding.batch_sharding(mesh, 1)
  sample_sh = sampler_lib.SampleOutput(batch_sh, batch_sh, batch_sh, batch_sh, vec_sh, vec_sh)
  experience_fn = jax.jit(make_experience, in_shardings=(state_sh, batch_sh, batch_sh, sample_sh))
  update_fn = jax.jit(
    update_and_control,
    in_shardings=(state_sh, None, rep),
    out_shardings=(state_sh, rep),
    donate_argnums=(0,),
  )

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
      state = init(policy_init, value_init, jax.random.key(config.seed))
  ckpt.install_sigterm_handler()
  stage_clock = rl_common.StageClock(previous_time, start=clock_start)

  # ------------------------------------------------------------- evaluator
  evaluate = rl_common.Evaluator(
    config, workdir, sft=sft, rm=rm, sample_fn=sample_fn, logps_fn=ref_logps, mesh=mesh, rules=rules
  )

  # ----------------------------------------------------------- train loop
  progress = metrics.ProgressLogger(
    config.total_steps,
    every_n_steps=config.log_every,
    start_step=start_step,
    metric_keys=("objective/scores", "objective/kl", "eval/gold_reward"),
  )
  cfg_model = lm_module.config
  seq = p_len + n_new
  per_seq = seq * cfg_model.train_flops_per_token(seq)
  networks = 1 if head else 2  # policy (+ separate value net) forward-backward per epoch
  flops = (
    rollout_batch * per_seq * (config.ppo_epochs * networks + (1 + networks + rm.ensemble_size) / 3)
  )
  loop = common.LoopBookkeeping(
    config, writer=writer, progress=progress, mesh=mesh, flops_per_step=flops, dtype=cfg_model.dtype
  )
  if start_step == 0:
    first = evaluate(lm_params(state["policy"]), 0)
    metrics.check_finite(0, first, context="eval")
    writer.write(0, first)
  step = start_step
  try:
    while step < config.total_steps:
      batch = next(prompt_loader)
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
          sample_fn(lm_params(state["policy"]), prompt, pmask, rollout_rng), timed, clock
        )
        exp, exp_stats = rl_common.timed(experience_fn(state, prompt, pmask, sample), timed, clock)
        state, upd_stats = rl_common.timed(
          update_fn(state, exp, exp_stats["objective/kl"]), timed, clock
        )
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
        step, stats, tokens, lambda: evaluate(lm_params(state["policy"]), step), preempted=preempted
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
      loop.final_eval(start_step, lambda: evaluate(lm_params(state["policy"]), step))
    rl_common.write_summary(
      workdir, "ppo", stage_clock.elapsed(), kl_coef=float(jax.device_get(state["kl"].kl_coef))
    )
    if not exported:
      stages.export(
        workdir,
        lm_params(state["policy"]),
        {
          "kind": "policy",
          "model": cfg_model.to_dict(),
          "tokenizer": "tokenizer.model",
          "step": step,
          "eval": loop.last_eval,
        },
      )
  return loop.last_eval
