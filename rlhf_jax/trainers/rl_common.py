"""What the policy-optimisation trainers (PPO, GRPO/RLOO, DPO, best-of-n) share.

Upstream stages trained on demand, the response log-prob and reward-model
score functions that every method jits into its own programs, the prompt
loader, the held-out evaluation on the testbed (gold reward, proxy reward,
KL to the reference, win rate against SFT), and the summary every method
writes, so `experiments/compare.py` can put them in one table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rlhf_jax import config_spec as cs
from rlhf_jax import (
  config_utils,
  errors,
  evaluation,
  metrics,
  models,
  rng,
  stages,
  utils,
)
from rlhf_jax.data import loader as loader_lib
from rlhf_jax.data import prompts as prompts_lib
from rlhf_jax.models import lora
from rlhf_jax.rl.logprobs import token_logprobs
from rlhf_jax.trainers import common

# ------------------------------------------------------------------- config

# Fields every policy optimiser shares: upstream stages, sampling, evaluation.
UPSTREAM_FIELDS: dict[str, cs.Check] = {
  "policy_init": cs.FinishedStage("policy"),
  "reward_init": cs.FinishedStage("reward"),
  "sft": cs.Stage(unless="policy_init"),
  "reward": cs.Stage(unless="reward_init"),
}
# The frozen reference of the KL penalty when it is not the policy the stage starts from
# (e.g. a policy continued from an earlier RL stage, kept close to the original SFT one).
REFERENCE_FIELDS: dict[str, cs.Check] = {"reference_init": cs.FinishedStage("policy")}
# Continuing another stage of the same trainer: its whole train state (policy, critic,
# optimizer, KL controller) and prompt order from its last checkpoint, on one learning-rate
# schedule of `schedule_steps` iterations (0: total_steps) shared by the stages of a chain.
CONTINUE_FIELDS: dict[str, cs.Check] = {
  "continue_from": cs.FinishedStage("policy"),
  "schedule_steps": cs.Int(min=0),
}


def schedule_steps(config) -> int:
  """Iterations the learning-rate schedule spans: schedule_steps, or total_steps when 0."""
  return config.get("schedule_steps") or config.total_steps


def check_continue(config, prefix: str) -> None:
  """schedule_steps covers the stage; continue_from names a stage of the same trainer."""
  if config.schedule_steps and config.schedule_steps < config.total_steps:
    raise cs.ConfigError(
      f"{prefix}.schedule_steps={config.schedule_steps} is less than {prefix}.total_steps="
      f"{config.total_steps}: the schedule must span the stage (0 = total_steps)."
    )
  source = config.continue_from
  if not source or "://" in source:
    return
  path = os.path.join(source, config_utils.CONFIG_FILENAME)
  try:
    with open(path) as f:
      trainer = json.load(f).get("trainer")
  except (OSError, ValueError) as error:
    raise cs.ConfigError(
      f"{prefix}.continue_from={source!r}: cannot read {path} ({error})"
    ) from None
  if trainer != config.trainer:
    raise cs.ConfigError(
      f"{prefix}.continue_from={source!r} is a {trainer!r} stage; a {config.trainer!r} "
      "stage continues only a stage of its own trainer."
    )


def check_reference(config, prefix: str) -> None:
  """Under LoRA the reference is the adapters' frozen base: no other reference fits."""
  if config.reference_init and config.lora.rank:
    raise cs.ConfigError(
      f"{prefix}.reference_init={config.reference_init!r} with {prefix}.lora.rank="
      f"{config.lora.rank}: under LoRA the reference is the adapters' frozen base, the policy "
      "the stage starts from. Leave reference_init empty."
    )


SAMPLING_FIELDS: dict[str, cs.Check] = {
  "prompt_len": cs.Int(min=1),
  "max_new_tokens": cs.Int(min=1),
  "temperature": cs.Float(gt=0),
}
# Where the rollout's log-probs (PPO's and GRPO's old policy) come from: "sampler" reads
# them off the sampler (log softmax(logits / T) of each drawn token, the distribution
# training recomputes), "recompute" runs the policy over the rollout again. Equal up to
# float rounding in float32 (cached decoding against one full pass); the sampler saves a
# forward pass of the policy per iteration.
OLD_LOGPROBS = ("sampler", "recompute")
OLD_LOGPROBS_FIELDS: dict[str, cs.Check] = {"old_logprobs": cs.Choice(*OLD_LOGPROBS)}
MISSING_EOS_FIELDS: dict[str, cs.Check] = {
  "missing_eos_penalty": cs.Bool(),
  "missing_eos_score": cs.Float(),
}
# The shared sections: prompts (rlhf_jax/data/prompts.py) and evaluation (rlhf_jax/evaluation.py).
PROMPT_DATA_SPEC = prompts_lib.SECTION_SPEC
EVAL_SPEC = evaluation.EVAL_SPEC


def check_eval(config, prefix: str) -> None:
  """The judge `config.eval.judge` names works with these prompts (a cross-field check)."""
  evaluation.check_judge(config, prefix, testbed_prompts=config.data.source == "testbed")


LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "token_sum_norm")


# ------------------------------------------------------ jittable functions


def response_window(prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
  """The positions [start, stop) of a [prompt | response] row whose logits predict the
  response tokens (position t predicts token t + 1)."""
  return prompt_len - 1, prompt_len + max_new_tokens - 1


def response_logps_fn(module, prompt_len: int, max_new_tokens: int, temperature: float):
  """f(params, full [B,P+N], fmask, response [B,N]) -> (log-probs [B,N], logits [B,N,V]).

  Log-probs of the response tokens under `module` at the sampling
  temperature, from the positions that predict them (position t predicts
  token t+1), so they equal the sampler's log-probs for the same params.
  """

  def fn(params, full, fmask, response):
    resp_logits, *_ = module.apply(
      {"params": params},
      full,
      models.positions_from_mask(fmask),
      models.causal_attention_mask(fmask),
      logits_window=response_window(prompt_len, max_new_tokens),
    )
    return token_logprobs(resp_logits, response, temperature), resp_logits

  return fn


def sampler(policy: stages.Policy, config, mesh, rules):
  """The policy's jitted, sharded sampler at `config.max_new_tokens` and `.temperature`
  (`Policy.sampler`); params passed to it must have `policy.shardings`."""
  return policy.sampler(
    max_new_tokens=config.max_new_tokens, temperature=config.temperature, mesh=mesh, rules=rules
  )


def gather_last(values: jax.Array, index: jax.Array) -> jax.Array:
  """values [..., B, S] at index [B] along the last axis -> [..., B]."""
  return jnp.take_along_axis(values, index[..., None], axis=-1)[..., 0]


def rm_score_fn(rm: stages.RewardModel, prompt_len: int, members: bool = False):
  """f(full [B,P+N], fmask, rmask [B,N]) -> normalised ensemble-mean score [B] (with
  `members`, every member's normalised score [E, B]).

  The score is read at each response's last token (index prompt_len +
  length - 1): the classic off-by-one is reading one past it, at padding.
  """

  def fn(full, fmask, rmask):
    last = prompt_len + jnp.maximum(jnp.sum(rmask, axis=-1) - 1, 0)
    positions = models.positions_from_mask(fmask)
    attn = models.causal_attention_mask(fmask)

    def member(params):
      return gather_last(rm.module.apply({"params": params}, full, positions, attn), last)

    raw = jax.vmap(member)(rm.params)
    if members:
      return rm.gain * raw + rm.bias
    return jnp.mean(rm.gain * raw + rm.bias, axis=0)

  return fn


def drop_leading(sh: jax.sharding.NamedSharding, mesh) -> jax.sharding.NamedSharding:
  """The sharding of one ensemble member from the stacked [E, ...] sharding."""
  return jax.sharding.NamedSharding(mesh, jax.P(*tuple(sh.spec)[1:]))


# ------------------------------------------------------------------ prompts


def load_prompts(config, tok, workdir: str) -> prompts_lib.PromptSet:
  """The run's training and held-out prompts (`config.data`), those too long left out.

  The counts (and the file:line of the first dropped prompts) go to
  `<workdir>/data_info.json` under "prompts".
  """
  prompt_set = prompts_lib.load(config.data, config.eval.num_prompts, tok, config.prompt_len)
  if jax.process_index() == 0:
    utils.write_json_atomic(os.path.join(workdir, "data_info.json"), {"prompts": prompt_set.info})
  logging.info("Prompts: %s", prompt_set.info)
  return prompt_set


def prompt_loader(
  config, tok, prompts: list[str], batch_size: int, key: str = "config.rollout_batch_size"
) -> loader_lib.Loader:
  """Deterministic, checkpointable loader of left-padded training prompts (`key` names the
  batch size in the error when there are fewer prompts than one batch)."""
  common.check_batch_fits(len(prompts), batch_size, "training prompts", key=key)

  def collate(examples):
    tokens, mask = prompts_lib.left_pad(tok, [e["prompt"] for e in examples], config.prompt_len)
    return {"tokens": tokens, "mask": mask}

  return loader_lib.Loader(
    [{"prompt": p} for p in prompts],
    global_batch_size=batch_size,
    seed=config.seed,
    collate=collate,
  )


# ------------------------------------------------------------------- eval


def make_evaluator(
  config,
  workdir,
  prompts,
  *,
  sft,
  rm,
  sample_fn,
  logps_fn,
  mesh,
  rules,
  proxy_host=None,
  testbed_prompts: bool | None = None,
  start_step: int = 0,
  model_config: models.ModelConfig | None = None,
  exporter=None,
) -> evaluation.Evaluator:
  """The held-out evaluator of an RL stage: `prompts`, the judge `config.eval.judge`, the
  reward model `rm` (or the host function `proxy_host`) as the proxy. `testbed_prompts`:
  whether the prompts are the testbed's (default: `config.data.source == "testbed"`).

  With `config.monitor` enabled it watches every eval (`monitor.watch.Watch`: detectors,
  alert rules, alerts.jsonl, the best policy in <workdir>/best), resuming at `start_step`;
  `model_config` is the evaluated policy's (for that export)."""
  if testbed_prompts is None:
    testbed_prompts = config.data.source == "testbed"
  judge = evaluation.make_judge(
    config,
    testbed_prompts=testbed_prompts,
    mesh=mesh,
    rules=rules,
    max_len=config.prompt_len + config.max_new_tokens + 2,
    batch_size=len(prompts),
  )
  watch = make_watch(config, workdir, start_step, sft.tokenizer, model_config, exporter)
  return evaluation.Evaluator(
    workdir,
    prompts=prompts,
    judge=judge,
    sft=sft,
    sample_fn=sample_fn,
    logps_fn=logps_fn,
    proxy_score=rm_score_fn(rm, config.prompt_len) if rm is not None else None,
    proxy_host=proxy_host,
    prompt_len=config.prompt_len,
    seed=rng.seed(config.seed, "eval"),
    mesh=mesh,
    rules=rules,
    watch=watch,
    # The members' scores, for the watch's ensemble disagreement (one more RM forward).
    proxy_members=rm_score_fn(rm, config.prompt_len, members=True)
    if watch is not None and rm is not None and rm.ensemble_size > 1
    else None,
  )


def make_watch(config, workdir: str, start_step: int, tokenizer, model_config, exporter=None):
  """The stage's `Watch` when `config.monitor.enabled`, else None."""
  from rlhf_jax.monitor import watch as watch_lib

  if not watch_lib.enabled(config):
    return None

  def export_best(directory: str, params, meta: dict[str, Any]) -> None:
    if model_config is None:
      return
    if jax.process_index() == 0:
      os.makedirs(directory, exist_ok=True)
      tokenizer.save(os.path.join(directory, tokenizer.filename))
    full = {
      "kind": "policy",
      "model": lora.plain(model_config).to_dict(),
      "tokenizer": tokenizer.filename,
      **meta,
    }
    stages.export(directory, lora.merged(params, model_config), full)

  primary = jax.process_index() == 0
  return watch_lib.Watch(
    config.monitor, workdir, start_step, primary=primary, export_best=export_best,
    exporter=exporter,
  )  # fmt: skip


def stopped_by_alert(evaluator) -> int | None:
  """The step an alert with action "stop" ended the stage at (None: it did not)."""
  watch = getattr(evaluator, "watch", None)
  return None if watch is None else watch.stopped


# ---------------------------------------------------------------- summary


def write_summary(
  workdir: str,
  method: str,
  wall_time_s: float,
  evaluator: str = "",
  continued_from: str = "",
  **extra,
) -> dict[str, Any]:
  """`<workdir>/summary.json` from the step-0 (SFT) and last eval lines of metrics.jsonl.

  Keys shared by every method: sft_gold_reward, gold_reward, gold_reward_gain (the
  judge's scores: the testbed's gold reward or its stand-in, see rlhf_jax/evaluation.py),
  sft_gold_reward_std (the spread of the judge's scores over the SFT policy's eval samples)
  and gold_gain_in_sft_std (the gain in units of that spread: an effect size),
  sft_proxy_reward, proxy_reward, kl_to_ref, sqrt_kl, win_rate_vs_sft with its 95%
  interval win_rate_vs_sft_low/high, evaluator (the judge's name), wall_time_s (this
  stage's own time, upstream stages excluded), and `extra`.

  A stage continued from another (`continued_from`, config.continue_from) starts from that
  stage's policy: its sft_* figures and gains are the SFT policy's, read from that stage's
  summary (down the chain to the stage that started from SFT); start_step,
  start_gold_reward and start_proxy_reward are its own first eval's, and sft_proxy_reward is
  None (the stage may score with another reward model).
  """
  evals = [r for r in metrics.read_metrics(workdir) if "eval/gold_reward" in r]
  first, final = evals[0], evals[-1]
  start = {}
  if continued_from:
    start = {
      "continued_from": continued_from,
      "start_step": first["step"],
      "start_gold_reward": first["eval/gold_reward"],
      "start_proxy_reward": first["eval/proxy_reward"],
    }
    first = _sft_eval(continued_from)
  summary = {
    "method": method,
    "sft_gold_reward": first["eval/gold_reward"],
    "gold_reward": final["eval/gold_reward"],
    "gold_reward_gain": final["eval/gold_reward"] - first["eval/gold_reward"],
    "sft_gold_reward_std": first.get("eval/gold_reward_std"),
    "gold_gain_in_sft_std": _effect_size(first, final),
    "sft_proxy_reward": first["eval/proxy_reward"],
    "proxy_reward": final["eval/proxy_reward"],
    "kl_to_ref": final["eval/kl_to_ref"],
    "sqrt_kl": final["eval/sqrt_kl"],
    "win_rate_vs_sft": final["eval/win_rate_vs_sft"],
    "win_rate_vs_sft_low": final.get("eval/win_rate_vs_sft_low"),
    "win_rate_vs_sft_high": final.get("eval/win_rate_vs_sft_high"),
    "evaluator": evaluator,
    "wall_time_s": wall_time_s,
    **start,
    **extra,
  }
  if jax.process_index() == 0:
    utils.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  logging.info("%s summary: %s", method, summary)
  return summary


def _sft_eval(stage_dir: str) -> dict[str, Any]:
  """The SFT policy's eval figures as a first eval line, from a finished RL stage's summary."""
  path = os.path.join(stage_dir, "summary.json")
  try:
    with open(path) as f:
      summary = json.load(f)
    return {
      "eval/gold_reward": summary["sft_gold_reward"],
      "eval/gold_reward_std": summary.get("sft_gold_reward_std"),
      "eval/proxy_reward": None,
    }
  except (OSError, ValueError, KeyError) as error:
    raise errors.ConfigError(
      f"config.continue_from={stage_dir!r}: no readable summary.json with sft_gold_reward ({error})"
    ) from None


def _effect_size(first: dict[str, Any], final: dict[str, Any]) -> float | None:
  """The gold gain over the SFT policy's eval in units of its samples' gold std."""
  std = first.get("eval/gold_reward_std")
  if not std:
    return None
  return (final["eval/gold_reward"] - first["eval/gold_reward"]) / std


EvalFn = Callable[[Any, int], dict[str, float]]


# ----------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
  """What every on-policy method's jitted functions read about rollouts and minibatches;
  PPO's and GRPO's `Settings` add their own fields."""

  prompt_len: int
  max_new_tokens: int
  temperature: float
  missing_eos_score: float | None  # None: no penalty for a response without EOS
  clip_eps: float
  loss_aggregation: str
  epochs: int
  minibatch_size: int
  rollout_batch_size: int
  old_logprobs: str = dataclasses.field(default="recompute", kw_only=True)  # OLD_LOGPROBS

  @staticmethod
  def fields(config, *, epochs: int, rollout_batch_size: int) -> dict[str, Any]:
    """This class's fields from a config of SAMPLING_FIELDS, MISSING_EOS_FIELDS,
    OLD_LOGPROBS_FIELDS and more."""
    return dict(
      old_logprobs=config.old_logprobs,
      prompt_len=config.prompt_len,
      max_new_tokens=config.max_new_tokens,
      temperature=config.temperature,
      missing_eos_score=config.missing_eos_score if config.missing_eos_penalty else None,
      clip_eps=config.clip_eps,
      loss_aggregation=config.loss_aggregation,
      epochs=epochs,
      minibatch_size=config.minibatch_size,
      rollout_batch_size=rollout_batch_size,
    )

  @property
  def updates_per_iteration(self) -> int:
    return self.epochs * (self.rollout_batch_size // self.minibatch_size)


# ------------------------------------------------------------ the RL loop
# What PPO and GRPO/RLOO do around their own jitted programs: `start` before the networks
# (then `with run:` around the rest, which closes it however the run ends), then the
# shared pieces of every trainer (`common.restore_or_init`, `common.bookkeeping`,
# `common.evaluate_start`, `common.save_if_due`), `PhaseClock` inside the loop and
# `finish` after it.


@dataclasses.dataclass
class Run(common.Run):
  """A policy optimiser's run (`common.Run`) with its finished upstream stages and prompts."""

  sft: stages.Policy
  rm: stages.RewardModel | None
  prompt_set: prompts_lib.PromptSet
  reference: stages.Policy  # `sft` unless `config.reference_init` names another stage


def start(
  config,
  workdir: str,
  *,
  batch_size: int,
  batch_key: str = "config.rollout_batch_size",
  reward: bool = True,
) -> Run:
  """The mesh, the finished upstream stages, the prompts and their loader (`batch_size`
  prompts a batch, named `batch_key` in errors), the checkpointer and metric writer.

  `reward`: whether the method needs the reward stage; one given in `config.reward_init`
  is loaded anyway (the evaluation's proxy reward). The stage clock starts after the
  stages load, as every earlier version measured it. Everything that can fail on the
  user's data happens before the checkpointer opens.
  """
  os.makedirs(workdir, exist_ok=True)
  mesh, rules = common.mesh_from_config(config), config.sharding_rules
  sft_dir = config_utils.require_stage(config, "policy_init")
  if reward:
    reward_dir = config_utils.require_stage(config, "reward_init")
  else:
    reward_dir = config.get("reward_init") or None
  clock_start = time.perf_counter()
  sft = stages.load_policy(sft_dir, mesh, rules)
  reference = load_reference(config, sft, mesh, rules)
  rm = stages.load_reward_model(reward_dir, mesh, rules) if reward_dir else None
  if jax.process_index() == 0:
    sft.tokenizer.save(os.path.join(workdir, sft.tokenizer.filename))
  prompt_set = load_prompts(config, sft.tokenizer, workdir)
  loader = prompt_loader(config, sft.tokenizer, prompt_set.train, batch_size, batch_key)
  return common.open_run(
    config, workdir, mesh, loader, clock_start=clock_start, cls=Run, sft=sft, rm=rm,
    prompt_set=prompt_set, reference=reference,
  )  # fmt: skip


def load_reference(config, sft: stages.Policy, mesh, rules) -> stages.Policy:
  """The KL reference: `config.reference_init`'s policy, or `sft` (the start) when empty.

  It must be the policy's architecture with the same vocabulary; with LoRA the reference
  is the adapters' frozen base, so another reference is refused.
  """
  path = config.get("reference_init")
  if not path:
    return sft
  key = f"config.reference_init={path!r}"
  check_reference(config, "config")
  reference = stages.load_policy(path, mesh, rules)
  if reference.module.config != sft.module.config:
    raise errors.ConfigError(
      f"{key}: its model differs from config.policy_init's ({config.policy_init}); the "
      "reference must be the same architecture."
    )
  if reference.tokenizer.vocab_size != sft.tokenizer.vocab_size:
    raise errors.ConfigError(f"{key}: its tokenizer differs from config.policy_init's.")
  return reference


class LoraPolicy:
  """The policy an RL stage trains with LoRA (`config.lora.rank > 0`), and the views of
  its frozen base the stage needs, so the base weights exist once.

  `policy`: a `stages.Policy` whose module has the adapters and whose params are the SFT
  policy's with fresh adapters (B = 0: it computes what the SFT policy computes). Once the
  train state holds them, `release(sft)` drops every other reference to the SFT
  parameters; from then on the reference is the state's own base (`lora.base`), and
  `reference_view(current)` is what the evaluator treats as the SFT policy: the adapted
  module with the state's base and zero adapters (exactly the SFT policy), read anew at
  every evaluation. The training programs run the reference as the plain module on
  `lora.base(params)` (no adapter products); the evaluator keeps the adapted module so that
  the policy and its reference share one compiled sampler and log-prob program.
  """

  def __init__(self, sft: stages.Policy, section, seed: int, mesh, rules):
    module, params, shardings = common.add_lora(
      sft.module, sft.params, section, rng.key(seed, "lora"), mesh, rules
    )
    self.policy = stages.Policy(module, params, shardings, sft.tokenizer, sft.meta)
    self.zero = jax.jit(
      lambda t: jax.tree.map(jnp.zeros_like, t), out_shardings=lora.adapters(shardings)
    )(lora.adapters(params))

  def release(self, sft: stages.Policy) -> None:
    self.policy.params = None
    sft.params = None

  def reference_view(self, current: Callable[[], Any]) -> ReferenceView:
    return ReferenceView(self.policy, current, self.zero)


class ReferenceView:
  """The SFT policy as the evaluator sees it under LoRA (`LoraPolicy.reference_view`):
  the adapted module and tokenizer, and params that are the current state's base
  (`current()`: the policy's params now) with zero adapters."""

  def __init__(self, policy: stages.Policy, current: Callable[[], Any], zero: Any):
    self.module, self.shardings, self.tokenizer = policy.module, policy.shardings, policy.tokenizer
    self._current, self._zero = current, zero

  @property
  def params(self) -> Any:
    return lora.attach(lora.base(self._current()), self._zero)


def finish(
  run: Run,
  loop,
  step: int,
  *,
  params: Callable[[], Any],
  evaluate: EvalFn,
  method: str,
  clock: common.StageClock,
  evaluator: str,
  model_config: models.ModelConfig,
  tokenizer_file: str,
  summary: dict[str, Any] | None = None,
  export: dict[str, Any] | None = None,
  watch=None,
) -> dict[str, float]:
  """After the loop (and `with run:`, which closed it): on the last step, summary.json and
  the export of the policy `params()`, once (a rerun after the export only rewrites the
  summary). `tokenizer_file`: the tokenizer's name in the workdir (`tok.filename`). A stage
  an alert stopped (`watch.stopped`) ends at that step the same way. `watch`'s record
  (alerts, the best policy) goes into the summary."""
  stopped = watch.stopped if watch is not None else None
  if step < run.config.total_steps and stopped is None:
    return loop.last_eval
  if stopped is not None:
    logging.warning("An alert stopped the stage at step %d (alerts.jsonl); exporting it.", step)
  exported = not stages.needs_export(run.workdir, step)
  if not exported:
    # The loop's last eval (recomputed if the run stopped after its final checkpoint).
    if stopped is not None and run.start_step == step and not loop.last_eval:
      loop.last_eval = evaluate(params(), step)
    loop.final_eval(run.start_step, lambda: evaluate(params(), step))
  summary = {**(summary or {}), **(watch.summary() if watch is not None else {})}
  write_summary(
    run.workdir,
    method,
    clock.elapsed(),
    evaluator=evaluator,
    continued_from=run.config.get("continue_from") or "",
    **summary,
  )
  if not exported:
    meta = {
      "kind": "policy",
      "model": lora.plain(model_config).to_dict(),  # adapters are merged into the export
      "tokenizer": tokenizer_file,
      "step": step,
      "eval": loop.last_eval,
      **(export or {}),
    }
    stages.export(run.workdir, lora.merged(params(), model_config), meta)
  return loop.last_eval


class PhaseClock:
  """Wall time of an iteration's phases (rollout, scoring, update), on log steps only.

  Blocking on a result stops the host from running ahead of the device, so only the
  iterations whose metrics are logged are timed: `PhaseClock(enabled, state)` first drains
  the earlier iterations (blocks on `state`), each `clock(result)` blocks and marks, and
  `metrics()` gives the times (empty when not enabled).
  """

  PHASES = ("rollout", "scoring", "update")

  def __init__(self, enabled: bool, state: Any = None):
    self.enabled = enabled
    if enabled:
      jax.block_until_ready(state)
    self.marks = [time.perf_counter()]

  def __call__(self, result):
    if self.enabled:
      jax.block_until_ready(result)
      self.marks.append(time.perf_counter())
    return result

  def metrics(self) -> dict[str, float]:
    if not self.enabled:
      return {}
    phases = np.diff(self.marks)
    out = {f"time/{name}_s": float(t) for name, t in zip(self.PHASES, phases, strict=True)}
    out["time/generation_fraction"] = float(phases[0] / phases.sum())
    return out


# Metrics that depend on wall-clock time: the loop's throughput and the phase times.
TIMING_METRICS = (
  "tokens_per_s",
  "steps_per_s",
  "mfu",
  *(f"time/{name}_s" for name in PhaseClock.PHASES),
  "time/generation_fraction",
)


def scan_minibatches(step_fn, carry, batch, key, *, epochs: int, minibatch_size: int):
  """`epochs` passes over `batch` in shuffled minibatches, in one `lax.scan`.

  step_fn(carry, minibatch) -> (carry, stats); every epoch draws its own permutation of
  the rows (from `key`), split into len/minibatch_size minibatches. Returns the last carry
  and each stat averaged over all steps.
  """
  rows = jax.tree.leaves(batch)[0].shape[0]
  perms = jax.vmap(lambda k: jax.random.permutation(k, rows))(jax.random.split(key, epochs))
  indices = perms.reshape(epochs * (rows // minibatch_size), minibatch_size)

  def body(carry, index):
    return step_fn(carry, jax.tree.map(lambda x: jnp.take(x, index, axis=0), batch))

  carry, stats = jax.lax.scan(body, carry, indices)
  return carry, jax.tree.map(jnp.mean, stats)
