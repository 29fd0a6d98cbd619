"""The human-feedback loop: rounds of sampling, pair selection, labels, a quality gate, a
reward-model update and a policy update.

    python -m experiments.launch --config=configs/loop.py
    python -m experiments.launch --config=configs/loop.py:runlocal

Round k (k = 0 .. rounds - 1) lives in `<workdir>/round_<k>/`:

  candidates.json     `candidates.prompts_per_round` fresh prompts (a seeded order over the
                      prompt pool, no prompt twice until the pool is used up), K responses
                      each from the current policy (the SFT policy in round 0)
  queue/pairs.jsonl   the pairs chosen to label: this round's budget, picked among every
                      pair of a prompt's responses by `strategy` (rlhf_jax/data/selection.py;
                      round 0 has no reward model yet, so score strategies pick at random
                      there), plus the anchor pairs in round 0
  queue/labels.jsonl  the labels, in the preference-file schema: from the testbed's rater
                      panel (`labeler="panel"`), or written by people through the labeling
                      page (`labeler="files"`; `python -m experiments.label_server
                      --queue=<workdir>/round_<k>/queue`). Until every pair there has a
                      label, the loop stops with a message saying so; rerun it after.
  gate.json           the quality gate on every label so far (rlhf_jax/data/quality_gate.py):
                      flagged raters, excluded by `gate.exclude`; a round under
                      `gate.min_panel_agreement` stops the loop with the reasons
  train_labels.jsonl  the labels the reward model trains on: all rounds', minus excluded
                      raters'
  reward/             the reward stage (the `reward` section) on those labels, evaluated on
                      fixed held-out pairs (`<workdir>/eval_pairs.jsonl`, the same every
                      round); `reward_mode="continue"` starts it from the last round's reward
                      model, "retrain" from the SFT trunk
  policy/             the RL stage (the `rl` section: PPO, GRPO, RLOO, ...) continued from the
                      last round's policy, with this round's reward model and the SFT policy
                      as its KL reference throughout
  round.json          what the round used and reached: labels, reward-model accuracy, gold

Every file is written atomically and reused when present, and the stages resume from their
checkpoints, so a loop killed anywhere and rerun ends as an uninterrupted run would, bit for
bit. `<workdir>/loop.json` gathers the rounds at the end.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import config_spec as cs
from rlhf_jax import config_utils, errors, rng, stages, utils
from rlhf_jax.data import preferences, quality_gate, selection
from rlhf_jax.data import prompts as prompts_lib
from rlhf_jax.trainers import common

LABELERS = ("panel", "files")
REWARD_MODES = ("continue", "retrain")
RL_MODES = ("continue", "restart")


class LabelsPending(errors.Error):
  """A round waits for people's labels (labeler "files"); rerun once they are in."""

  kind = "waiting for labels"


class GateFailed(errors.Error):
  """A round's labels failed the quality gate; the message names the report."""

  kind = "quality gate"


def _check_labeler(config, prefix: str) -> None:
  if config.labeler == "panel" and config.data.source != "testbed":
    raise cs.ConfigError(
      f"{prefix}.labeler='panel' is the testbed's simulated raters, which need testbed "
      f"prompts; {prefix}.data.source={config.data.source!r}. Use labeler='files'."
    )


def _check_strategy(config, prefix: str) -> None:
  members = config.reward.ensemble_size
  if config.strategy == "ensemble_disagreement" and members < 2:
    raise cs.ConfigError(
      f"{prefix}.strategy='ensemble_disagreement' needs {prefix}.reward.ensemble_size >= 2, "
      f"got {members}."
    )


def _check_rl(config, prefix: str) -> None:
  needs = "continue_from" if config.rl_mode == "continue" else "reference_init"
  if config.rounds > 1 and needs not in config.rl:
    raise cs.ConfigError(
      f"{prefix}.rl.trainer={config.rl.get('trainer')!r} has no {needs}: the loop continues "
      f"the policy round after round ({prefix}.rl_mode={config.rl_mode!r}). Use ppo, grpo or "
      "rloo (configs/ppo.py, grpo.py, rloo.py)."
    )


CONFIG_SPEC = cs.Spec(
  {
    **cs.RUN_FIELDS,
    "rounds": cs.Int(min=1),
    "policy_init": cs.FinishedStage("policy"),
    "sft": cs.Stage(unless="policy_init"),
    "labels_per_round": cs.Int(min=1),
    "total_labels": cs.Int(min=0),
    "strategy": cs.Choice(*selection.STRATEGIES),
    "labeler": cs.Choice(*LABELERS),
    "candidates": cs.Spec(
      {
        "prompts_per_round": cs.Int(min=1),
        "responses_per_prompt": cs.Int(min=2),
        "temperature": cs.Float(gt=0),
        "max_new_tokens": cs.Int(min=1),
        "prompt_len": cs.Int(min=1),
        "sample_batch": cs.Int(min=1),
      }
    ),
    "data": prompts_lib.SECTION_SPEC,
    "num_eval_pairs": cs.Int(min=0),
    "eval_files": cs.Seq(cs.Path("file", optional=False)),
    "gate": quality_gate.CONFIG_SPEC,
    "reward_mode": cs.Choice(*REWARD_MODES),
    "rl_mode": cs.Choice(*RL_MODES),
    "reward": cs.Stage(),
    "rl": cs.Stage(),
  },
  checks=(_check_labeler, _check_strategy, _check_rl, cs.mesh_batch("candidates.sample_batch")),
)


# ----------------------------------------------------------------------------- helpers


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _write_jsonl(path: str, records) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  utils.write_jsonl_atomic(path, records)


def round_budget(config, k: int) -> int:
  """Labelled pairs round k buys: labels_per_round, within total_labels (0: no cap)."""
  if not config.total_labels:
    return config.labels_per_round
  return max(0, min(config.labels_per_round, config.total_labels - k * config.labels_per_round))


def _np_rng(config, k: int, what: int) -> np.random.Generator:
  return np.random.default_rng([rng.seed(config.data.seed, "loop"), k, what])


def prompt_pool(config, tok) -> list[str]:
  """The training prompts the rounds draw from (`config.data`), in a seeded order."""
  pool = prompts_lib.load(config.data, 1, tok, config.candidates.prompt_len).train
  texts = [p.text if hasattr(p, "text") else p for p in pool]
  order = np.random.default_rng([rng.seed(config.data.seed, "loop"), 0, 0]).permutation(len(texts))
  return [texts[i] for i in order]


def round_prompts(pool: list[str], per_round: int, k: int) -> list[str]:
  """Round k's prompts: the next `per_round` of the pool, wrapping around when used up."""
  return [pool[(k * per_round + i) % len(pool)] for i in range(per_round)]


QUEUE_FILE = "pairs.jsonl"  # the pairs to label (experiments/label_server.py serves them)
LABELS_FILE = "labels.jsonl"  # their labels, in the preference-file schema


def read_queue(queue_dir: str) -> list[dict[str, Any]]:
  with open(os.path.join(queue_dir, QUEUE_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]


def queue_labels(queue_dir: str) -> list[dict[str, Any]]:
  """The labels of a round's queue, once every ordinary pair there has one.

  Raises:
    LabelsPending: some pair has no label yet (none at all when labels.jsonl is missing).
    DataError: a malformed labels file (file, line, field).
  """
  wanted = [q["pair_id"] for q in read_queue(queue_dir) if not q.get("anchor")]
  path = os.path.join(queue_dir, LABELS_FILE)
  records = preferences.read_preferences(path) if os.path.exists(path) else []
  labelled = {r["pair_id"] for r in records}
  have = sum(p in labelled for p in wanted)
  if have < len(wanted):
    raise LabelsPending(
      f"{queue_dir}: {have} of {len(wanted)} pairs have a label",
      hint=f"Label them with `python -m experiments.label_server --queue={queue_dir}`, then "
      "rerun this command; the loop continues from there.",
    )
  return records


class Loop:
  """One loop run: the config, its workdir, the mesh, and the finished SFT stage."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.mesh, self.rules = common.mesh_from_config(config), config.sharding_rules
    self.sft_dir = config_utils.require_stage(config, "policy_init")
    self.timings: list[dict[str, Any]] = []
    self._panel = None

  @property
  def panel(self):
    if self._panel is None:
      from rlhf_jax.data import testbed

      self._panel = testbed.RaterPanel(self.config.data.testbed)
    return self._panel

  def generator(self, policy_dir: str):
    """f(prompts, key) -> responses from the finished policy stage, loaded once."""
    c = self.config.candidates
    policy = stages.load_policy(policy_dir, self.mesh, self.rules)
    return policy.generator(
      max_new_tokens=c.max_new_tokens, temperature=c.temperature, prompt_len=c.prompt_len,
      batch_size=c.sample_batch, mesh=self.mesh, rules=self.rules,
    )  # fmt: skip

  # ------------------------------------------------------------------ eval pairs
  def eval_files(self) -> list[str]:
    """Held-out pairs the reward model of every round is measured on (the same file)."""
    config = self.config
    if config.eval_files:
      return list(config.eval_files)
    if config.labeler != "panel" or not config.num_eval_pairs:
      return []
    path = os.path.join(self.workdir, "eval_pairs.jsonl")
    if not os.path.exists(path):
      from rlhf_jax.data import pairs as pairs_lib

      generate = self.generator(self.sft_dir)
      seed = rng.seed(config.data.seed, "eval_pairs")
      triples = pairs_lib.sample_comparisons(
        generate, config.num_eval_pairs, 2, "eval", seed, config.data.testbed
      )
      records = self.panel.label(triples, np.random.default_rng([seed, 7]))
      if jax.process_index() == 0:
        preferences.write_preference_jsonl(records, path, skip_invalid=True)
    return [path]

  # ------------------------------------------------------------------ one round
  def candidates(self, k: int, rdir: str, policy_dir: str, pool: list[str]) -> dict[str, Any]:
    path = os.path.join(rdir, "candidates.json")
    if os.path.exists(path):
      return _read_json(path)
    c = self.config.candidates
    prompts = round_prompts(pool, c.prompts_per_round, k)
    key = jax.random.fold_in(rng.key(self.config.seed, "loop_samples"), k)
    generate = self.generator(policy_dir)
    samples = [generate(prompts, jax.random.fold_in(key, i)) for i in range(c.responses_per_prompt)]
    out = {"prompts": prompts, "responses": [list(r) for r in zip(*samples, strict=True)]}
    if jax.process_index() == 0:
      utils.write_json_atomic(path, out)
    return out

  def select(self, k: int, rdir: str, cands: dict[str, Any], reward_dir: str) -> dict[str, Any]:
    """Chooses this round's pairs and writes the queue; returns the selection's record."""
    path = os.path.join(rdir, "queue", QUEUE_FILE)
    info_path = os.path.join(rdir, "selection.json")
    if os.path.exists(path) and os.path.exists(info_path):
      return _read_json(info_path)
    config = self.config
    prompts, responses = cands["prompts"], cands["responses"]
    pairs = selection.candidate_pairs(responses)
    strategy = config.strategy
    scores = None
    if strategy in selection.NEEDS_SCORES:
      if not reward_dir:
        strategy = "random"  # round 0: no reward model yet
      else:
        scores = self.member_scores(reward_dir, prompts, responses)
    chosen, criterion = selection.select(
      strategy, pairs, round_budget(config, k), _np_rng(config, k, 1), scores=scores,
      prompts=prompts, responses=responses,
    )  # fmt: skip
    queue = []
    for n, index in enumerate(chosen):
      p, i, j = (int(v) for v in pairs[index])
      queue.append(
        {
          "pair_id": f"r{k}-{n}",
          "prompt": prompts[p],
          "response_a": responses[p][i],
          "response_b": responses[p][j],
          "criterion": None if math.isnan(criterion[index]) else float(criterion[index]),
        }
      )
    if k == 0 and config.labeler == "panel":
      queue += [
        {"pair_id": f"anchor-{n}", "prompt": p, "response_a": a, "response_b": b, "anchor": True}
        for n, (p, a, b) in enumerate(self.panel.anchor_pairs)
      ]
    info = {
      "strategy": config.strategy,
      "strategy_used": strategy,
      "num_candidates": len(pairs),
      "num_selected": len(chosen),
      "mean_criterion_selected": _finite_mean(criterion[chosen]),
      "mean_criterion_all": _finite_mean(criterion),
    }
    if jax.process_index() == 0:
      _write_jsonl(path, queue)
      utils.write_json_atomic(info_path, info)
    return info

  def member_scores(self, reward_dir: str, prompts, responses) -> np.ndarray:
    """[E, P, K] normalised member scores of every candidate response."""
    rm = stages.load_reward_model(reward_dir, self.mesh, self.rules)
    flat_p = [p for p, rs in zip(prompts, responses, strict=True) for _ in rs]
    flat_r = [r for rs in responses for r in rs]
    scores = rm.score_texts(
      flat_p, flat_r, mesh=self.mesh, rules=self.rules, max_len=self.config.reward.max_len,
      members=True,
    )  # fmt: skip
    return scores.reshape(scores.shape[0], len(prompts), -1)

  def labels(self, k: int, rdir: str) -> list[dict[str, Any]]:
    """This round's labels: the panel's (made once), or the labeling page's (checked)."""
    queue_dir = os.path.join(rdir, "queue")
    path = os.path.join(queue_dir, LABELS_FILE)
    if self.config.labeler == "panel" and not os.path.exists(path):
      records = self._panel_labels(k, read_queue(queue_dir))
      if jax.process_index() == 0:
        preferences.write_preference_jsonl(records, path, skip_invalid=True)
    return queue_labels(queue_dir)

  def _panel_labels(self, k: int, queue: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The testbed panel's labels of the queue; each round's clock starts a day later."""
    label_rng = _np_rng(self.config, k, 2)
    start = self.config.data.testbed.panel.start_time + k * 86400.0
    ordinary = [q for q in queue if not q.get("anchor")]
    records = []
    if any(q.get("anchor") for q in queue):
      records += self.panel.label_anchors(label_rng, start_time=start)
      for r in records:
        r["pair_id"] = f"anchor-{r['pair_id']}"
      start = max(r["time"] for r in records)  # the anchors first, then the round's pairs
    labelled = self.panel.label(
      [(q["prompt"], q["response_a"], q["response_b"]) for q in ordinary], label_rng,
      start_time=start,
    )  # fmt: skip
    for q, r in zip(ordinary, labelled, strict=True):
      r["pair_id"] = q["pair_id"]
    return records + labelled

  def gate(self, k: int, rdir: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    gate = quality_gate.check(records, self.config.gate)
    if self.config.labeler == "panel":
      careless = [str(r.rater_id) for r in self.panel.raters if r.eps > 0]
      gate["testbed"] = quality_gate.scored(gate, careless)
    path = os.path.join(rdir, "gate.json")
    if jax.process_index() == 0:
      utils.write_json_atomic(path, utils.jsonable(gate))
    logging.info(
      "Round %d gate: flagged %s, excluded %s, panel agreement %.3f",
      k, gate["flagged"], gate["excluded"], gate["panel_agreement"],
    )  # fmt: skip
    if not gate["passed"]:
      raise GateFailed(
        f"round {k}: " + "; ".join(gate["reasons"]) + f" (report: {path})",
        hint="Look at the per-rater figures there; fix or replace the raters, then rerun.",
      )
    return gate

  def run_stage(self, section: ml_collections.ConfigDict, stage_dir: str, **fields) -> None:
    if stages.is_complete(stage_dir):
      self.timings.append(dict(stage=os.path.relpath(stage_dir, self.workdir), seconds=0.0))
      return
    child = ml_collections.ConfigDict(section.to_dict())
    for key, value in fields.items():
      node = child
      *parents, leaf = key.split(".")
      for part in parents:
        node = node[part]
      node[leaf] = value
    config_utils.run(child, stage_dir, timings=self.timings)

  def rl_fields(self, k: int, policy_dir: str) -> dict[str, Any]:
    """Round k's policy-stage keys: from the last round's policy, the SFT one the reference.

    "continue": the last round's stage goes on (its policy, critic, optimizer and KL
    controller) to (k + 1) rl.total_steps iterations, all rounds on one learning-rate
    schedule of rounds x rl.total_steps; "restart": a fresh stage of rl.total_steps from the
    last round's exported policy (a new critic, warm-up and schedule every round).
    """
    steps = self.config.rl.total_steps
    if self.config.rl_mode == "continue":
      fields = {"policy_init": self.sft_dir, "total_steps": (k + 1) * steps}
      fields["schedule_steps"] = self.config.rounds * steps
      if policy_dir != self.sft_dir:
        fields["continue_from"] = policy_dir
      return fields
    fields = {"policy_init": policy_dir}
    if policy_dir != self.sft_dir:  # the SFT policy stays the KL reference
      fields["reference_init"] = self.sft_dir
    return fields

  def round(self, k: int, pool, all_labels, policy_dir: str, reward_dir: str, evals) -> dict:
    config = self.config
    rdir = os.path.join(self.workdir, f"round_{k}")
    cands = self.candidates(k, rdir, policy_dir, pool)
    chosen = self.select(k, rdir, cands, reward_dir)
    records = self.labels(k, rdir)
    all_labels.extend(records)
    gate = self.gate(k, rdir, all_labels)
    train_file = os.path.join(rdir, "train_labels.jsonl")
    if jax.process_index() == 0:
      preferences.write_preference_jsonl(quality_gate.keep(all_labels, gate), train_file)
    new_reward = os.path.join(rdir, "reward")
    data = {"data.source": "jsonl", "data.train_files": (train_file,)}
    data["data.eval_files"] = tuple(evals)
    continued = reward_dir and config.reward_mode == "continue"
    self.run_stage(
      config.reward,
      new_reward,
      policy_init=self.sft_dir,
      reward_init=reward_dir if continued else "",
      **data,
    )
    new_policy = os.path.join(rdir, "policy")
    self.run_stage(config.rl, new_policy, reward_init=new_reward, **self.rl_fields(k, policy_dir))
    rm_eval = stages.read_meta(new_reward).get("eval") or {}
    summary = _read_json(os.path.join(new_policy, "summary.json"))
    result = {
      "round": k,
      "labels_round": len(records),
      "labels_total": len(all_labels),
      "labels_trained_on": gate["num_kept"],
      "selection": chosen,
      "gate": {key: gate[key] for key in ("flagged", "excluded", "panel_agreement")},
      "gate_testbed": gate.get("testbed"),
      "reward_eval_accuracy": rm_eval.get("eval/accuracy"),
      "policy": {
        key: summary.get(key)
        for key in (
          "gold_reward",
          "gold_reward_gain",
          "sft_gold_reward",
          "proxy_reward",
          "kl_to_ref",
          "win_rate_vs_sft",
        )
      },
    }
    if jax.process_index() == 0:
      utils.write_json_atomic(os.path.join(rdir, "round.json"), utils.jsonable(result))
    logging.info("Round %d: %s", k, result)
    return result, new_policy, new_reward


def _finite_mean(values) -> float | None:
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if len(values) else None


def train(config: Any, workdir: str) -> dict[str, Any]:
  """Runs the loop's rounds; returns and writes (`<workdir>/loop.json`) their results."""
  CONFIG_SPEC.validate(config)
  os.makedirs(workdir, exist_ok=True)
  loop = Loop(config, workdir)
  sft = stages.load_policy(loop.sft_dir, loop.mesh, loop.rules)
  pool = prompt_pool(config, sft.tokenizer)
  del sft
  evals = loop.eval_files()
  policy_dir, reward_dir = loop.sft_dir, ""
  all_labels: list[dict[str, Any]] = []
  rounds = []
  for k in range(config.rounds):
    result, policy_dir, reward_dir = loop.round(k, pool, all_labels, policy_dir, reward_dir, evals)
    rounds.append(result)
  out = {
    "rounds": rounds,
    "final_policy": policy_dir,
    "final_reward": reward_dir,
    "stage_seconds": loop.timings,
  }
  if jax.process_index() == 0:
    utils.write_json_atomic(os.path.join(workdir, "loop.json"), utils.jsonable(out))
  return out
