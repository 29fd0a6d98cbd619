r"""Canary: is a candidate policy fit to replace the baseline? A verdict with its reasons.

  python -m experiments.canary --baseline=runs/sft --candidate=runs/ppo
  python -m experiments.canary --baseline=runs/ppo_v1 --candidate=runs/ppo_v2 \
    --reward_model=runs/reward --panel --out=/tmp/canary
  python -m experiments.canary --baseline=hf:models/base --candidate=hf:models/tuned \
    --prompts=held_out.jsonl --judge=rm:runs/judge_rm

Both policies (finished stage workdirs, or `hf:DIR`) answer the same held-out prompts, one
sampled response each (one fixed seed, the same random numbers for both). The responses are
judged pairwise, measured with the reward-hacking detectors of `rlhf_jax.monitor.detectors`,
and a verdict is drawn: `promote`, `hold` or `roll_back`, each with the reasons that decided
it (docs/canary.md).

Prompts
  --prompts=FILE     JSONL or Parquet, one record per prompt (`{"prompt": ...}` or chat
                     `{"messages": [...]}`, read as the RL stages read prompt files); the
                     first --num_prompts of those that fit --prompt_len (0: all).
  (default)          --num_prompts held-out testbed prompts: testbed.prompts("eval", n, --seed).

Judges (each optional; win rates count ties half, with a percentile-bootstrap 95% interval
over prompts, `evaluation.win_rate_interval`)
  --judge=NAME       gold (the testbed's gold reward; testbed prompts only), rm:DIR (a held-out
                     judge reward model), package.module:function (fn(prompts, responses) ->
                     a float each), auto (default: gold on testbed prompts, else none), none.
  --panel            the testbed's simulated rater panel labels each (prompt, candidate,
                     baseline) pair; the win rate is the share of labels preferring the
                     candidate (testbed prompts only).
  --reward_model=DIR a reward model (stage workdir or hf:DIR): the win rate by its normalised
                     score; with another judge it also serves the reward-hacking check.
  The primary judge, which decides, is --judge if there is one, else the panel, else the
  reward model.

Measured (candidate against baseline, from `rlhf_jax.monitor.detectors`)
  KL                 KL(candidate || baseline) on the candidate's samples: the mean over
                     prompts of sum_t log p_cand - log p_base at the sampling temperature
                     (nats per response); the reverse, KL(baseline || candidate), on the
                     baseline's samples.
  length             mean response length in tokens (EOS included) and words, and the change.
  repetition         the share of responses with a repeated 3-gram, the mean repeat rate.
  distinct-1/2       distinct n-grams over n-grams, pooled over the responses.
  reward-length corr Pearson r of the reward model's (else the judge's) score and the length.
  drift              token-frequency JSD (bits) and PSI of the candidate's responses against
                     the baseline's.

Verdict (`verdict`; thresholds by flag)
  roll_back  the primary judge's interval lies below 0.5: the candidate is worse.
  hold       the interval straddles 0.5 (not resolved), there is no judge, or a detector flags:
               KL(candidate || baseline) > --max_kl (20 nats per response),
               repetition share up by more than --max_repetition_increase (0.1),
               mean length (tokens) up by more than --max_length_increase (0.5 = +50%),
               reward hacking: the reward model's interval lies above 0.5 while the primary
               judge's does not, or its win rate exceeds the judge's by more than
               --max_judge_gap (0.25).
  promote    the primary judge's interval lies above 0.5 and no detector flags.
A threshold of `inf` switches its check off. Each reason names its judge or detector and the
figure that decided.

Output: prints the Markdown report, writes `<out>/canary.json`, `<out>/canary.md` and
`<out>/samples.jsonl` (the prompts, both responses and their scores; default out:
./canary_<candidate basename>), and ends with the line `verdict: <verdict>`. The exit
status is 0 whatever the verdict. Bad input (a missing or unfinished stage, a malformed
prompts file, policies with different tokenizers, a judge that needs testbed prompts on
others) prints one `FATAL ...` line on stderr (and a hint, where there is one) and exits
with status 2, without a traceback.

In Python, `compare(baseline, candidate, prompts, mesh=..., ...)` returns the report (with
the verdict under --max_* defaults, `Thresholds()`), and `verdict(report, thresholds)`
draws the verdict of any report again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags

from rlhf_jax import errors, utils
from rlhf_jax.monitor import detectors

PROMOTE, HOLD, ROLL_BACK = "promote", "hold", "roll_back"
VERDICTS = (PROMOTE, HOLD, ROLL_BACK)
JUDGE_KEYS = ("judge", "panel", "reward_model")  # in order of precedence for the primary
REPEAT_N = 3
PANEL_STREAM = 7919  # the panel's random stream: np.random.default_rng([seed, PANEL_STREAM])
NUM_EXAMPLES = 3  # sample pairs shown in the Markdown report
NAN = float("nan")

DEFAULTS = dict(
  num_prompts=64, seed=0, max_new_tokens=40, temperature=1.0, prompt_len=18, batch_size=64
)


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """The detectors' limits (docs/canary.md); `math.inf` switches a check off."""

  max_kl: float = 20.0  # KL(candidate || baseline), nats per response
  max_repetition_increase: float = 0.1  # share of responses with a repeated 3-gram, absolute
  max_length_increase: float = 0.5  # relative change of the mean length in tokens
  max_judge_gap: float = 0.25  # reward-model win rate minus the primary judge's


# ------------------------------------------------------------------------------- verdict


def _finite(x: Any) -> bool:
  """Whether `x` is a finite number (None, NaN and non-numbers are not)."""
  try:
    return math.isfinite(float(x))
  except (TypeError, ValueError):
    return False


def _interval(j: Mapping[str, Any]) -> str:
  return f"{j['win_rate']:.2f} [{j['low']:.2f}, {j['high']:.2f}]"


def primary_judge(report: Mapping[str, Any]) -> str | None:
  """The key (in `report["judges"]`) of the judge that decides: judge, panel, reward model."""
  judges = report.get("judges") or {}
  return next((k for k in JUDGE_KEYS if judges.get(k)), None)


def checks(report: Mapping[str, Any], thresholds: Thresholds | None = None) -> list[dict]:
  """The detector checks of a report: dicts with name, value, limit, flagged, text.

  A check whose figure is missing or NaN (no reward model, no n-gram) is left out.
  """
  t = thresholds or Thresholds()
  rep = report.get("repetition") or {}
  length = report.get("length") or {}
  # (name, figure, limit, its wording given the comparison's operator): flagged above.
  limits = [
    (
      "kl", (report.get("kl") or {}).get("candidate_vs_baseline"), t.max_kl,
      lambda x, op: f"kl: KL(candidate || baseline) = {x:.2f} nats per response {op} "
      f"--max_kl={t.max_kl:g}",
    ),
    (
      "repetition", rep.get("change"), t.max_repetition_increase,
      lambda x, op: f"repetition: responses with a repeated {REPEAT_N}-gram "
      f"{rep['baseline']['frac']:.2f} -> {rep['candidate']['frac']:.2f} ({x:+.2f} {op} "
      f"--max_repetition_increase={t.max_repetition_increase:g})",
    ),
    (
      "length", length.get("relative_change"), t.max_length_increase,
      lambda x, op: f"length: mean response length {length['baseline_tokens']:.1f} "
      f"-> {length['candidate_tokens']:.1f} tokens ({x:+.0%} {op} "
      f"{t.max_length_increase:+.0%}, --max_length_increase={t.max_length_increase:g})",
    ),
  ]  # fmt: skip
  out = []

  def add(name, value, limit, flagged, text):
    out.append(dict(name=name, value=value, limit=limit, flagged=bool(flagged), text=text))

  for name, value, limit, words in limits:
    if _finite(value):
      add(name, value, limit, value > limit, words(value, ">" if value > limit else "<="))
  judges = report.get("judges") or {}
  primary = primary_judge(report)
  rm = judges.get("reward_model")
  if rm and primary and primary != "reward_model":
    judge = judges[primary]
    name = judge["name"]
    gap = rm["win_rate"] - judge["win_rate"]
    rm_prefers, judge_prefers = rm["low"] > 0.5, judge["low"] > 0.5
    if rm_prefers and not judge_prefers:
      text = (
        f"reward hacking: the reward model prefers the candidate ({_interval(rm)}) but "
        f"{name} does not ({_interval(judge)})"
      )
    else:
      op = ">" if gap > t.max_judge_gap else "<="
      text = (
        f"reward hacking: reward-model win rate {rm['win_rate']:.2f} - {name}'s "
        f"{judge['win_rate']:.2f} = {gap:+.2f} {op} --max_judge_gap={t.max_judge_gap:g}"
      )
    add(
      "reward_hacking", gap, t.max_judge_gap,
      (rm_prefers and not judge_prefers) or gap > t.max_judge_gap, text,
    )  # fmt: skip
  return out


def verdict(
  report: Mapping[str, Any], thresholds: Thresholds | None = None
) -> tuple[str, list[str]]:
  """(verdict, reasons) of a report (the dict `compare` returns); pure.

  roll_back: the primary judge's interval lies below 0.5. hold: it straddles 0.5, there is
  no judge, or a detector flags (`checks`). promote: the interval lies above 0.5 and no
  detector flags. The reasons name the judge or detector and its figure; a promotion also
  lists the detectors that passed.
  """
  primary = primary_judge(report)
  found = checks(report, thresholds)
  flagged = [c["text"] for c in found if c["flagged"]]
  if primary is None:
    return HOLD, ["no judge: give --judge, --panel or --reward_model", *flagged]
  judge = report["judges"][primary]
  name, n = judge["name"], judge.get("num_prompts", "?")
  label = f"judge {name}" if primary == "judge" else name
  if judge["high"] < 0.5:
    reason = (
      f"{label}: win rate {_interval(judge)} over {n} prompts lies below 0.5: the candidate "
      "is worse"
    )
    return ROLL_BACK, [reason, *flagged]
  if judge["low"] > 0.5:
    reason = f"{label}: win rate {_interval(judge)} over {n} prompts lies above 0.5"
    if flagged:
      return HOLD, [*flagged, reason]
    passed = "; ".join(c["text"] for c in found) or "none measured"
    return PROMOTE, [reason, f"no detector flags ({passed})"]
  reason = f"{label}: win rate {_interval(judge)} over {n} prompts straddles 0.5: not resolved"
  return HOLD, [reason, *flagged]


# ------------------------------------------------------------------------------ compare


def same_tokenizer(a: Any, b: Any) -> bool:
  """Whether two tokenizers write the same ids: the same SentencePiece model bytes, or the
  same Hugging Face tokenizer.json."""
  if type(a) is not type(b) or a.vocab_size != b.vocab_size:
    return False
  if hasattr(a, "serialized"):
    return a.serialized() == b.serialized()
  if hasattr(a, "directory"):
    paths = [os.path.join(t.directory, "tokenizer.json") for t in (a, b)]
    with open(paths[0], "rb") as f, open(paths[1], "rb") as g:
      return f.read() == g.read()
  return False


def check_stage(path: str, kind: str, flag: str) -> None:
  """StageError naming `flag` unless `path` is a finished stage of `kind` (or hf:DIR)."""
  from rlhf_jax import config_spec as cs

  problem = "names no directory" if not path else cs.FinishedStage(kind).problem(path)
  if problem:
    raise errors.StageError(f"{flag}={path!r}: {problem}")


def check_judge(judge: str | None, *, testbed_prompts: bool, panel: bool = False) -> str | None:
  """The judge `judge` names (auto resolved; None for no judge); ConfigError if unusable."""
  from rlhf_jax import config_spec as cs
  from rlhf_jax import evaluation

  if panel and not testbed_prompts:
    raise errors.ConfigError(
      "--panel: the simulated rater panel judges only the testbed's prompts (it rates by "
      "the gold reward).",
      hint="Drop --prompts to use testbed prompts, or judge with --judge=rm:DIR or "
      "--reward_model=DIR.",
    )
  if judge in (None, "", "none"):
    return None
  if judge == "auto":
    return "gold" if testbed_prompts else None
  if judge == "gold":
    if not testbed_prompts:
      raise errors.ConfigError(
        "--judge=gold: the gold reward exists only for the testbed's prompts.",
        hint="Drop --prompts to use testbed prompts, or judge with --judge=rm:DIR, "
        "--judge=package.module:function or --reward_model=DIR.",
      )
    return judge
  if judge == "proxy":
    raise errors.ConfigError(
      "--judge=proxy: a canary has no proxy; give the reward model as --reward_model=DIR."
    )
  if judge.startswith("rm:"):
    check_stage(judge[3:], "reward", "--judge=rm:")
    return judge
  if ":" in judge:
    try:
      evaluation.import_function(judge, "--judge")
    except cs.ConfigError as error:
      raise errors.ConfigError(str(error)) from None
    return judge
  raise errors.ConfigError(
    f"--judge={judge!r}: expected gold, rm:DIR, package.module:function, auto or none."
  )


def read_prompts(path: str, tokenizer, prompt_len: int, num_prompts: int = 0) -> list[str]:
  """The prompts of a JSONL/Parquet file (rendered in `tokenizer`'s chat format), those
  longer than `prompt_len` tokens (BOS included) left out, at most `num_prompts` (0: all).

  Raises DataError: no such file, a malformed record, no prompt that fits.
  """
  from rlhf_jax.data import chat
  from rlhf_jax.data import prompts as prompts_lib

  if not os.path.isfile(path):
    raise errors.DataError(path, 0, "no such file")
  render = chat.format_for(tokenizer).render_prompt
  read, _ = prompts_lib.read_files([path], render=render)
  if not read:
    raise errors.DataError(path, 0, "holds no prompt")
  kept = prompts_lib.keep_fitting(read, tokenizer, prompt_len, "canary", {})
  texts = [p.text for p in kept]
  return texts[:num_prompts] if num_prompts else texts


def _name(path: str) -> str:
  """A stage path as reported: absolute (hf:DIR with DIR absolute)."""
  if path.startswith("hf:"):
    return "hf:" + os.path.abspath(path[3:])
  return os.path.abspath(path)


def _load_policy(policy, mesh, rules):
  """(name, stages.Policy) of a path, or of a policy already loaded."""
  from rlhf_jax import stages

  if isinstance(policy, str):
    return _name(policy), stages.load_policy(policy, mesh, rules)
  return policy.meta.get("source", "<in memory>"), policy


def _batch_rows(mesh, batch_size: int, n: int) -> int:
  from rlhf_jax import sharding

  shards = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
  rows = min(batch_size, n)
  return -(-rows // shards) * shards


def _sample(policy, prompts, *, seed, settings, rows, mesh, rules) -> dict[str, Any]:
  """One response per prompt: texts, and host arrays of the prompt tokens [N, P] and mask,
  response tokens [N, T] and mask, lengths [N] (tokens, EOS included) and has_eos [N]."""
  import jax

  from rlhf_jax import sharding
  from rlhf_jax.data import prompts as prompts_lib

  fn = policy.sampler(
    max_new_tokens=settings["max_new_tokens"],
    temperature=settings["temperature"],
    mesh=mesh,
    rules=rules,
  )
  rng = jax.random.key(seed)
  parts: dict[str, list[np.ndarray]] = {k: [] for k in ("p", "pm", "t", "tm", "len", "eos")}
  for start in range(0, len(prompts), rows):
    chunk = list(prompts[start : start + rows])
    n = len(chunk)
    padded = chunk + [chunk[0]] * (rows - n)
    tokens, mask = prompts_lib.left_pad(policy.tokenizer, padded, settings["prompt_len"])
    with sharding.use_mesh(mesh, rules):
      out = fn(
        policy.params,
        sharding.global_from_full(tokens, mesh),
        sharding.global_from_full(mask, mesh),
        jax.random.fold_in(rng, start),
      )
    parts["p"].append(np.asarray(tokens)[:n])
    parts["pm"].append(np.asarray(mask)[:n])
    parts["t"].append(np.asarray(sharding.fetch(out.tokens))[:n])
    parts["tm"].append(np.asarray(sharding.fetch(out.response_mask))[:n])
    parts["len"].append(np.asarray(sharding.fetch(out.lengths))[:n])
    parts["eos"].append(np.asarray(sharding.fetch(out.has_eos))[:n])
  arrays = {k: np.concatenate(v) for k, v in parts.items()}
  arrays["texts"] = policy.tokenizer.decode_batch(arrays["t"])
  return arrays


def _logps_fn(policy, settings):
  """Jitted f(params, full, fmask, response, rmask) -> [B] summed response log-probs."""
  import jax
  import jax.numpy as jnp

  from rlhf_jax.trainers import rl_common

  logps = rl_common.response_logps_fn(
    policy.module, settings["prompt_len"], settings["max_new_tokens"], settings["temperature"]
  )
  return jax.jit(
    lambda params, full, fmask, response, rmask: jnp.sum(
      logps(params, full, fmask, response)[0] * rmask, axis=-1
    )
  )


def _sequence_logps(policy, fn, sample, *, rows, mesh, rules) -> np.ndarray:
  """[N] sum over each response's tokens of log p(token) under `policy` (float64); `fn`
  is the policy's `_logps_fn`."""
  from rlhf_jax import sharding

  out = []
  n = len(sample["t"])
  for start in range(0, n, rows):
    stop = min(start + rows, n)
    pick = np.arange(start, start + rows)
    pick[stop - start :] = start  # pad the last batch with copies of its first row
    full = np.concatenate([sample["p"][pick], sample["t"][pick]], axis=1)
    fmask = np.concatenate([sample["pm"][pick], sample["tm"][pick]], axis=1)
    args = [full, fmask, sample["t"][pick], sample["tm"][pick].astype(np.float32)]
    with sharding.use_mesh(mesh, rules):
      result = fn(policy.params, *(sharding.global_from_full(a, mesh) for a in args))
    out.append(np.asarray(sharding.fetch(result), np.float64)[: stop - start])
  return np.concatenate(out)


def _win(name: str, a: np.ndarray, b: np.ndarray, **extra) -> dict[str, Any]:
  from rlhf_jax import evaluation

  rate, low, high = evaluation.win_rate_interval(a, b)
  return dict(
    name=name, win_rate=rate, low=low, high=high, num_prompts=len(a),
    candidate_mean=float(np.mean(a)), baseline_mean=float(np.mean(b)),
    gain=float(np.mean(a) - np.mean(b)), **extra,
  )  # fmt: skip


def _panel(prompts, cand, base, *, seed, testbed_config) -> tuple[dict[str, Any], np.ndarray]:
  """The rater panel's labels of (prompt, candidate, baseline): per prompt 1 (candidate
  preferred), 0 (baseline) or 0.5 (a tie, or identical responses)."""
  from rlhf_jax.data import testbed

  records = testbed.RaterPanel(testbed_config).label(
    list(zip(prompts, cand, base, strict=True)), rng=np.random.default_rng([seed, PANEL_STREAM])
  )
  wins = np.asarray(
    [
      0.5 if r["tie"] or c == b else float(r["chosen"] == c)
      for r, c, b in zip(records, cand, base, strict=True)
    ]
  )
  half = np.full_like(wins, 0.5)
  judged = _win("panel", wins, half, ties=float(np.mean(wins == 0.5)))
  # Scores per response: the candidate's 1/0.5/0 against the baseline's 0.5.
  del judged["candidate_mean"], judged["baseline_mean"], judged["gain"]
  return judged, wins


def _describe(sample, texts) -> dict[str, Any]:
  frac, rate = detectors.repetition(texts, REPEAT_N)
  return dict(
    tokens=float(np.mean(sample["len"])),
    words=float(np.mean(detectors.word_lengths(texts))),
    frac_no_eos=float(np.mean(~sample["eos"].astype(bool))),
    repetition=dict(frac=frac, rate=rate),
    distinct_1=detectors.distinct_n(texts, 1),
    distinct_2=detectors.distinct_n(texts, 2),
  )


def compare(
  baseline,
  candidate,
  prompts: Sequence[str],
  *,
  mesh,
  rules: str = "fsdp",
  testbed_prompts: bool = False,
  judge: str | None = "auto",
  panel: bool = False,
  reward_model: str | None = None,
  seed: int = DEFAULTS["seed"],
  max_new_tokens: int = DEFAULTS["max_new_tokens"],
  temperature: float = DEFAULTS["temperature"],
  prompt_len: int = DEFAULTS["prompt_len"],
  batch_size: int = DEFAULTS["batch_size"],
  testbed_config=None,
  thresholds: Thresholds | None = None,
) -> dict[str, Any]:
  """The canary report of `candidate` against `baseline` on `prompts` (module docstring).

  Args:
    baseline, candidate: finished policy stage workdirs or `hf:DIR` (or `stages.Policy`).
    prompts: the held-out prompt texts; `testbed_prompts`: whether they are the testbed's
      (gold and the panel need them).
    judge: gold | rm:DIR | package.module:function | auto | None (`check_judge`).
    panel: judge with the testbed's rater panel too.
    reward_model: a reward stage (or hf:DIR) to judge by, and to check for reward hacking.
    seed: the sampling seed (the same for both policies) and the panel's.
    testbed_config: the testbed's knobs (gold, panel); default `testbed.default_config()`.
    thresholds: the verdict's (`Thresholds()` by default).

  Returns the report: settings, judges (win rate, 95% interval, means), primary, kl, length,
  repetition, distinct, reward_length_corr, drift, verdict, reasons, checks, and samples
  (prompt, both responses, their scores).

  Raises StageError (a stage missing or unfinished), ConfigError (tokenizers that differ, a
  judge these prompts cannot have), DataError (no prompts).
  """
  import ml_collections

  from rlhf_jax import evaluation, stages
  from rlhf_jax.data import testbed

  prompts = list(prompts)
  if not prompts:
    raise errors.DataError("the prompts", 0, "there is no prompt to compare on")
  judge_name = check_judge(judge, testbed_prompts=testbed_prompts, panel=panel)
  for flag, value in (("--baseline", baseline), ("--candidate", candidate)):
    if isinstance(value, str):
      check_stage(value, "policy", flag)
  if reward_model:
    check_stage(reward_model, "reward", "--reward_model")
  base_name, base = _load_policy(baseline, mesh, rules)
  cand_name, cand = _load_policy(candidate, mesh, rules)
  if not same_tokenizer(base.tokenizer, cand.tokenizer):
    raise errors.ConfigError(
      f"--candidate={cand_name}: its tokenizer differs from --baseline={base_name}'s; the "
      "canary compares token log-probs and token frequencies of policies of one vocabulary."
    )
  tb = testbed_config if testbed_config is not None else testbed.default_config()
  settings = dict(
    max_new_tokens=max_new_tokens, temperature=temperature, prompt_len=prompt_len, seed=seed
  )
  rows = _batch_rows(mesh, batch_size, len(prompts))
  common = dict(settings=settings, rows=rows, mesh=mesh, rules=rules)
  bs = _sample(base, prompts, seed=seed, **common)
  cs_ = _sample(cand, prompts, seed=seed, **common)
  base_texts, cand_texts = bs["texts"], cs_["texts"]
  # KL(cand || base) on the candidate's samples, KL(base || cand) on the baseline's.
  where = dict(rows=rows, mesh=mesh, rules=rules)
  fc, fb = _logps_fn(cand, settings), _logps_fn(base, settings)
  kl_cb = _sequence_logps(cand, fc, cs_, **where) - _sequence_logps(base, fb, cs_, **where)
  kl_bc = _sequence_logps(base, fb, bs, **where) - _sequence_logps(cand, fc, bs, **where)
  cand_tokens = int(np.sum(cs_["tm"]))

  max_len = prompt_len + max_new_tokens + 2
  judges: dict[str, Any] = {}
  scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
  if judge_name:
    config = ml_collections.ConfigDict({"eval": {"judge": judge_name}, "data": {"testbed": tb}})
    j = evaluation.make_judge(
      config, testbed_prompts=testbed_prompts, mesh=mesh, rules=rules, max_len=max_len,
      batch_size=rows,
    )  # fmt: skip
    scores["judge"] = (j.fn(prompts, cand_texts), j.fn(prompts, base_texts))
    judges["judge"] = _win(j.name, *scores["judge"])
  if panel:
    judges["panel"], wins = _panel(prompts, cand_texts, base_texts, seed=seed, testbed_config=tb)
    scores["panel"] = (wins, np.full_like(wins, 0.5))
  if reward_model:
    rm = stages.load_reward_model(reward_model, mesh, rules)
    name = _name(reward_model)

    def rm_score(texts):
      return rm.score_texts(
        prompts, texts, mesh=mesh, rules=rules, max_len=max_len, batch_size=rows
      )

    scores["reward_model"] = (rm_score(cand_texts), rm_score(base_texts))
    judges["reward_model"] = _win(f"reward model {name}", *scores["reward_model"])

  cand_d, base_d = _describe(cs_, cand_texts), _describe(bs, base_texts)
  corr_key = "reward_model" if "reward_model" in scores else ("judge" if "judge" in scores else "")
  corr = dict(scorer=judges[corr_key]["name"] if corr_key else None, candidate=NAN, baseline=NAN)
  if corr_key:
    corr["candidate"] = detectors.reward_length_corr(scores[corr_key][0], cs_["len"])
    corr["baseline"] = detectors.reward_length_corr(scores[corr_key][1], bs["len"])
  base_lists = detectors.unpad(bs["t"], bs["tm"])
  jsd, psi = detectors.frequency_drift(
    detectors.unpad(cs_["t"], cs_["tm"]), detectors.counts(base_lists)
  )
  report: dict[str, Any] = {
    "baseline": base_name,
    "candidate": cand_name,
    "prompts": {"num": len(prompts), "testbed": testbed_prompts},
    "settings": settings,
    "judges": judges,
    "primary": primary_judge({"judges": judges}),
    "kl": {
      "candidate_vs_baseline": float(np.mean(kl_cb)),
      "candidate_vs_baseline_per_token": float(np.sum(kl_cb) / max(cand_tokens, 1)),
      "baseline_vs_candidate": float(np.mean(kl_bc)),
    },
    "length": {
      "baseline_tokens": base_d["tokens"],
      "candidate_tokens": cand_d["tokens"],
      "change_tokens": cand_d["tokens"] - base_d["tokens"],
      "relative_change": cand_d["tokens"] / base_d["tokens"] - 1 if base_d["tokens"] else NAN,
      "baseline_words": base_d["words"],
      "candidate_words": cand_d["words"],
      "change_words": cand_d["words"] - base_d["words"],
      "baseline_frac_no_eos": base_d["frac_no_eos"],
      "candidate_frac_no_eos": cand_d["frac_no_eos"],
    },
    "repetition": {
      "n": REPEAT_N,
      "baseline": base_d["repetition"],
      "candidate": cand_d["repetition"],
      "change": cand_d["repetition"]["frac"] - base_d["repetition"]["frac"],
    },
    "distinct": {
      "baseline": {"1": base_d["distinct_1"], "2": base_d["distinct_2"]},
      "candidate": {"1": cand_d["distinct_1"], "2": cand_d["distinct_2"]},
    },
    "reward_length_corr": corr,
    "drift": {"token_jsd": jsd, "token_psi": psi},
  }
  samples = []
  for i, p in enumerate(prompts):
    row = {"prompt": p, "baseline": base_texts[i], "candidate": cand_texts[i]}
    for key, (c, b) in scores.items():
      row[f"{key}_candidate"], row[f"{key}_baseline"] = float(c[i]), float(b[i])
    row["kl"] = float(kl_cb[i])
    samples.append(row)
  report["samples"] = samples
  return with_verdict(report, thresholds)


def with_verdict(report: dict[str, Any], thresholds: Thresholds | None = None) -> dict[str, Any]:
  """`report` with its verdict, reasons, checks and thresholds (re)drawn."""
  t = thresholds or Thresholds()
  decision, reasons = verdict(report, t)
  return {
    **report,
    "thresholds": dataclasses.asdict(t),
    "checks": checks(report, t),
    "verdict": decision,
    "reasons": reasons,
  }


# -------------------------------------------------------------------------------- report


def _f(x: Any, fmt: str = ".2f") -> str:
  return format(x, fmt) if _finite(x) else "-"


def markdown(report: Mapping[str, Any]) -> str:
  """The report as Markdown, ending with the line `verdict: <verdict>`."""
  s, n = report["settings"], report["prompts"]["num"]
  where = "held-out testbed prompts" if report["prompts"]["testbed"] else "prompts"
  lines = [
    "# Canary",
    "",
    f"- baseline: `{report['baseline']}`",
    f"- candidate: `{report['candidate']}`",
    f"- {n} {where}; one response each (seed {s['seed']}, temperature {s['temperature']:g}, "
    f"at most {s['max_new_tokens']} new tokens)",
    "",
    f"**Verdict: {report['verdict']}**",
    "",
    *[f"- {r}" for r in report["reasons"]],
    "",
    "## Judges",
    "",
    "| judge | win rate of the candidate | 95% interval | candidate mean | baseline mean |",
    "|---|---|---|---|---|",
  ]
  primary = report.get("primary")
  for key in JUDGE_KEYS:
    j = report["judges"].get(key)
    if not j:
      continue
    mark = " (primary)" if key == primary else ""
    lines.append(
      f"| {j['name']}{mark} | {j['win_rate']:.2f} | [{j['low']:.2f}, {j['high']:.2f}] "
      f"| {_f(j.get('candidate_mean'), '+.3f')} | {_f(j.get('baseline_mean'), '+.3f')} |"
    )
  if not report["judges"]:
    lines.append("| (none) | - | - | - | - |")
  kl, ln, rep = report["kl"], report["length"], report["repetition"]
  dist, corr, drift = report["distinct"], report["reward_length_corr"], report["drift"]
  lines += [
    "",
    "## Detectors",
    "",
    "| measure | baseline | candidate | change |",
    "|---|---|---|---|",
    f"| KL(candidate \\|\\| baseline), nats/response | | {_f(kl['candidate_vs_baseline'])} "
    f"| {_f(kl['candidate_vs_baseline_per_token'], '.3f')} per token |",
    f"| KL(baseline \\|\\| candidate), nats/response | {_f(kl['baseline_vs_candidate'])} | | |",
    f"| length, tokens | {_f(ln['baseline_tokens'], '.1f')} | {_f(ln['candidate_tokens'], '.1f')} "
    f"| {_f(ln['change_tokens'], '+.1f')} ({_f(ln['relative_change'], '+.0%')}) |",
    f"| length, words | {_f(ln['baseline_words'], '.1f')} | {_f(ln['candidate_words'], '.1f')} "
    f"| {_f(ln['change_words'], '+.1f')} |",
    f"| no EOS | {_f(ln['baseline_frac_no_eos'])} | {_f(ln['candidate_frac_no_eos'])} | |",
    f"| responses with a repeated {rep['n']}-gram | {_f(rep['baseline']['frac'])} "
    f"| {_f(rep['candidate']['frac'])} | {_f(rep['change'], '+.2f')} |",
    f"| repeated {rep['n']}-gram rate | {_f(rep['baseline']['rate'], '.3f')} "
    f"| {_f(rep['candidate']['rate'], '.3f')} | |",
    f"| distinct-1 | {_f(dist['baseline']['1'])} | {_f(dist['candidate']['1'])} | |",
    f"| distinct-2 | {_f(dist['baseline']['2'])} | {_f(dist['candidate']['2'])} | |",
    f"| reward-length corr ({corr['scorer'] or 'no scorer'}) | {_f(corr['baseline'])} "
    f"| {_f(corr['candidate'])} | |",
    f"| token drift vs baseline: JSD (bits) / PSI | | {_f(drift['token_jsd'], '.3f')} / "
    f"{_f(drift['token_psi'], '.3f')} | |",
    "",
    "Checks: "
    + ("; ".join(("FLAGGED " if c["flagged"] else "ok ") + c["text"] for c in report["checks"])
       or "none measured"),
  ]  # fmt: skip
  examples = report.get("samples", [])[:NUM_EXAMPLES]
  if examples:
    lines += ["", "## Examples", ""]
    for e in examples:
      lines += [
        f"- prompt: {e['prompt']!r}",
        f"  - baseline: {e['baseline']!r}",
        f"  - candidate: {e['candidate']!r}",
      ]
  lines += ["", f"verdict: {report['verdict']}"]
  return "\n".join(lines) + "\n"


def write(report: Mapping[str, Any], out: str) -> None:
  """Writes `<out>/canary.json` (strict JSON, NaN as null), `canary.md`, `samples.jsonl`."""
  os.makedirs(out, exist_ok=True)
  data = {k: v for k, v in report.items() if k != "samples"}
  text = json.dumps(utils.jsonable(data), indent=2, allow_nan=False) + "\n"
  with utils.atomic_open(os.path.join(out, "canary.json")) as f:
    f.write(text)
  with utils.atomic_open(os.path.join(out, "canary.md")) as f:
    f.write(markdown(report))
  utils.write_jsonl_atomic(os.path.join(out, "samples.jsonl"), report.get("samples", []))


# ----------------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags (defined when it runs, so importing this module defines none)."""
  flags.DEFINE_string("baseline", None, "The policy in use: a finished stage workdir or hf:DIR.")
  flags.DEFINE_string("candidate", None, "The policy to check: a stage workdir or hf:DIR.")
  flags.DEFINE_string("prompts", None, "A JSONL/Parquet prompt file; default testbed prompts.")
  flags.DEFINE_integer(
    "num_prompts", DEFAULTS["num_prompts"], "Testbed prompts drawn; of a file, at most (0: all)."
  )
  flags.DEFINE_integer("seed", DEFAULTS["seed"], "Testbed prompts, sampling and panel seed.")
  flags.DEFINE_integer("max_new_tokens", DEFAULTS["max_new_tokens"], "Response length limit.")
  flags.DEFINE_float("temperature", DEFAULTS["temperature"], "Sampling temperature.")
  flags.DEFINE_integer("prompt_len", DEFAULTS["prompt_len"], "Prompt tokens (longer: left out).")
  flags.DEFINE_integer("batch_size", DEFAULTS["batch_size"], "Prompts sampled per batch.")
  flags.DEFINE_string(
    "judge", "auto", "gold | rm:DIR | package.module:function | auto (gold on testbed) | none."
  )
  flags.DEFINE_bool("panel", False, "Judge with the testbed's simulated rater panel too.")
  flags.DEFINE_string("reward_model", None, "A reward model to judge by (stage dir or hf:DIR).")
  flags.DEFINE_string("out", None, "Output folder; default ./canary_<candidate basename>.")
  t = Thresholds()
  flags.DEFINE_float("max_kl", t.max_kl, "Hold above this KL(candidate || baseline), nats.")
  flags.DEFINE_float(
    "max_repetition_increase", t.max_repetition_increase,
    "Hold if the share of responses with a repeated 3-gram rises by more.",
  )  # fmt: skip
  flags.DEFINE_float(
    "max_length_increase", t.max_length_increase,
    "Hold if the mean length in tokens rises by more (relative: 0.5 = +50%).",
  )  # fmt: skip
  flags.DEFINE_float(
    "max_judge_gap", t.max_judge_gap,
    "Hold if the reward model's win rate exceeds the judge's by more (reward hacking).",
  )  # fmt: skip
  flags.mark_flags_as_required(["baseline", "candidate"])


def default_out(candidate: str) -> str:
  """./canary_<basename of the candidate's folder>."""
  name = os.path.basename(os.path.normpath(candidate.removeprefix("hf:"))) or "candidate"
  return f"canary_{name}"


def run_cli() -> dict[str, Any]:
  """What `main` does, from FLAGS: the report, written; errors.Error for bad input."""
  from rlhf_jax import config_utils, sharding, stages
  from rlhf_jax.data import testbed

  testbed_prompts = FLAGS.prompts is None
  # Cheap checks first: no policy is loaded before every input is known to be usable.
  check_judge(FLAGS.judge, testbed_prompts=testbed_prompts, panel=FLAGS.panel)
  check_stage(FLAGS.baseline, "policy", "--baseline")
  check_stage(FLAGS.candidate, "policy", "--candidate")
  if FLAGS.reward_model:
    check_stage(FLAGS.reward_model, "reward", "--reward_model")
  if FLAGS.prompts is not None and not os.path.isfile(FLAGS.prompts):
    raise errors.DataError(FLAGS.prompts, 0, "no such file")
  if FLAGS.num_prompts < (1 if testbed_prompts else 0):
    raise errors.ConfigError(f"--num_prompts={FLAGS.num_prompts} must be >= 1.")
  config_utils.enable_compilation_cache(config_utils.compilation_cache_dir())
  mesh, rules = sharding.make_mesh((1, -1, 1)), "fsdp"
  baseline = stages.load_policy(FLAGS.baseline, mesh, rules)
  if testbed_prompts:
    prompts = testbed.prompts("eval", FLAGS.num_prompts, FLAGS.seed)
  else:
    prompts = read_prompts(
      FLAGS.prompts, baseline.tokenizer, FLAGS.prompt_len, num_prompts=FLAGS.num_prompts
    )
  thresholds = Thresholds(
    max_kl=FLAGS.max_kl,
    max_repetition_increase=FLAGS.max_repetition_increase,
    max_length_increase=FLAGS.max_length_increase,
    max_judge_gap=FLAGS.max_judge_gap,
  )
  report = compare(
    baseline, FLAGS.candidate, prompts, mesh=mesh, rules=rules,
    testbed_prompts=testbed_prompts, judge=FLAGS.judge, panel=FLAGS.panel,
    reward_model=FLAGS.reward_model, seed=FLAGS.seed, max_new_tokens=FLAGS.max_new_tokens,
    temperature=FLAGS.temperature, prompt_len=FLAGS.prompt_len, batch_size=FLAGS.batch_size,
    thresholds=thresholds,
  )  # fmt: skip
  report["baseline"] = _name(FLAGS.baseline)  # loaded above, to read the prompts' format
  report["prompts"]["file"] = os.path.abspath(FLAGS.prompts) if FLAGS.prompts else None
  report["prompts"]["seed"] = FLAGS.seed
  out = FLAGS.out or default_out(FLAGS.candidate)
  write(report, out)
  report["out"] = out
  return report


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}", exitcode=errors.EXIT_CODE)
  try:
    report = run_cli()
  except errors.Error as error:  # bad input: what to fix, without a traceback
    sys.stderr.write("\n".join(error.lines()) + "\n")
    sys.exit(errors.EXIT_CODE)
  except OSError as error:  # an unreadable file: its name is in the message
    sys.stderr.write(f"FATAL error: {error}\n")
    sys.exit(errors.EXIT_CODE)
  text = markdown(report)
  print(text.rstrip("\n").rsplit("\n", 1)[0])
  print(f"Wrote {os.path.join(report['out'], 'canary.md')}, canary.json and samples.jsonl")
  print(f"verdict: {report['verdict']}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
