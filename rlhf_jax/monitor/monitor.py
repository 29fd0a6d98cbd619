"""`Monitor`: the detectors applied once per eval step against reference statistics.

The first `reference_evals` calls (by default one: the step-0 eval of the starting policy)
set the reference: the means and standard deviations of the proxy's and the judge's
per-sample scores, the ensemble disagreement, the mean token entropy, the mean response
length, and the token (or word) frequencies of the prompts and of the responses. Every call
then returns the `monitor/...` metrics (METRIC_NAMES) of its eval against that reference and
a bounded history of earlier evals (for the trends and the KL median). Metrics whose inputs
were not given, or are undefined (a one-member ensemble, a constant reference), are NaN.

  mon = Monitor(config.monitor)
  ...at each eval step:
  line = mon.update(step, prompts=prompts, responses=texts, proxy=proxy, judge=judged,
                    member_scores=members, lengths=lengths, kl=kl)
  ...in the checkpoint's metadata (JSON): mon.state_dict(); on resume: mon.load_state_dict(d)

An update at a step at or before one already in the history replaces that part of it, so
an eval repeated after a resume is not counted twice.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.monitor import config as config_lib
from rlhf_jax.monitor import detectors as d

STATE_VERSION = 1
PREFIX = "monitor/"
METRIC_NAMES = tuple(
  PREFIX + name
  for name in (
    "proxy_gain",  # (mean proxy - reference mean) / reference std
    "judge_gain",  # the same for the judge
    "proxy_gold_gap",  # proxy_gain - judge_gain
    "proxy_gold_gap_trend",  # its slope per eval over the last trend_window evals (>= 3)
    "ensemble_disagreement",  # mean over samples of the members' std
    "ensemble_disagreement_ratio",  # over the reference's
    "reward_length_corr",  # pearson(proxy, lengths)
    "length_ratio",  # mean length / reference mean length
    "length_trend",  # slope of the mean length per eval / reference mean length
    "repeat_ngram_frac",  # fraction of responses with a repeated n-gram
    "repeat_ngram_rate",  # mean fraction of a response's n-grams that are repeats
    "distinct_1",
    "distinct_2",
    "kl_spike_ratio",  # latest KL / median of the previous kl_window
    "kl_robust_z",  # (latest - median) / (1.4826 MAD)
    "entropy_ratio",  # mean token entropy / reference entropy
    "prompt_jsd",  # token-frequency JSD (bits) of the prompts against the reference's
    "prompt_psi",
    "response_jsd",  # the same for the responses
    "response_psi",
  )
)
# Per-eval values the history keeps besides the metrics.
_RAW = ("kl", "mean_length")


def _empty_reference() -> dict[str, Any]:
  return {
    "evals": 0,
    "steps": [],
    "proxy": [0, 0.0, 0.0],  # n, sum, sum of squares of per-sample scores
    "judge": [0, 0.0, 0.0],
    "disagreement": [0, 0.0],  # samples, sum of their members' std
    "disagreement_given": None,  # set_reference_disagreement: overrides the pooled one
    "entropy": [0, 0.0],  # evals, sum of their mean entropies
    "length": [0, 0.0],  # samples, sum of lengths
    "length_unit": None,  # "tokens" (lengths given) or "words" (counted from texts)
    "prompt_counts": collections.Counter(),
    "prompt_unit": None,
    "response_counts": collections.Counter(),
    "response_unit": None,
  }


def _moments(acc: Sequence[float]) -> tuple[float, float]:
  """(mean, std with ddof 0) of an [n, sum, sum of squares] accumulator; NaN if n = 0."""
  n, s, ss = acc
  if not n:
    return d.NAN, d.NAN
  mean = s / n
  return mean, math.sqrt(max(ss / n - mean * mean, 0.0))


def _ratio(acc: Sequence[float]) -> float:
  n, s = acc
  return s / n if n else d.NAN


def _strict(x: float) -> float | None:
  return x if math.isfinite(x) else None


def _loose(x: float | None) -> float:
  return d.NAN if x is None else float(x)


class Monitor:
  """Reward-hacking and drift metrics per eval step (module docstring).

  config: a `config.monitor` section (`monitor_section()`; missing fields take the
  defaults; None = all defaults), validated with `CONFIG_SPEC` under `prefix`.
  reference_disagreement: the reference ensemble disagreement measured elsewhere (e.g. on
  the reward model's eval pairs: `detectors.ensemble_disagreement` of their member scores);
  default: pooled from the reference evals' `member_scores`.
  """

  def __init__(
    self,
    config: Any = None,
    *,
    reference_disagreement: float | None = None,
    prefix: str = "config.monitor",
  ):
    self.config = config_lib.resolve(config, prefix)
    self._reference = _empty_reference()
    self._history: list[dict[str, Any]] = []
    if reference_disagreement is not None:
      self.set_reference_disagreement(reference_disagreement)

  @property
  def enabled(self) -> bool:
    return bool(self.config["enabled"])

  @property
  def reference_done(self) -> bool:
    """Whether the reference is complete (its `reference_evals` evals were seen)."""
    return self._reference["evals"] >= self.config["reference_evals"]

  def set_reference_disagreement(self, value: Any) -> None:
    """The reference disagreement: a float, or an [E, M] array of member scores."""
    ref = float(value) if np.ndim(value) == 0 else d.ensemble_disagreement(value)
    self._reference["disagreement_given"] = _strict(ref)

  # -------------------------------------------------------------------------------- update

  def update(
    self,
    step: int,
    *,
    prompts: Sequence[str] | None = None,
    responses: Sequence[str] | None = None,
    proxy: Any = None,
    judge: Any = None,
    member_scores: Any = None,
    lengths: Any = None,
    kl: Any = None,
    entropy: Any = None,
    entropy_mask: Any = None,
    prompt_tokens: Sequence[Sequence[int]] | None = None,
    response_tokens: Sequence[Sequence[int]] | None = None,
  ) -> dict[str, float]:
    """The METRIC_NAMES of one eval (NaN where an input is missing); {} when disabled.

    step: the training step of the eval (0 for the starting policy).
    prompts, responses: the N eval prompts and responses (texts).
    proxy, judge: [N] proxy (normalised ensemble mean) and judge scores.
    member_scores: [E, N] every reward-model member's normalised score.
    lengths: [N] response lengths in tokens (default: words of `responses`).
    kl: the eval's KL to the reference, [N] per sample or their mean.
    entropy: mean token entropy, or per-token entropies (any shape, `entropy_mask` true at
      real tokens; NaN entries are left out).
    prompt_tokens, response_tokens: token ids without padding (`detectors.unpad`), for the
      drift metrics; default: the words of `prompts` / `responses`.
    """
    if not self.enabled:
      return {}
    cfg, ref = self.config, self._reference
    step = int(step)
    history = [h for h in self._history if h["step"] < step]

    proxy, judge = d.floats(proxy), d.floats(judge)
    if lengths is not None:
      lengths, length_unit = d.floats(lengths), "tokens"
    elif responses is not None:
      lengths, length_unit = d.word_lengths(responses), "words"
    else:
      lengths, length_unit = d.floats(None), None
    prompt_units, prompt_unit = _units(prompt_tokens, prompts)
    response_units, response_unit = _units(response_tokens, responses)
    mean_entropy = d.mean_entropy(entropy, entropy_mask) if entropy is not None else d.NAN
    spread = None
    if member_scores is not None:
      s = np.asarray(member_scores, np.float64)
      if s.ndim == 2 and s.shape[0] >= 2:
        spread = np.std(s, axis=0)
        spread = spread[np.isfinite(spread)]

    in_reference = not self.reference_done
    if in_reference:
      self._accumulate(step, proxy, judge, spread, mean_entropy, lengths, length_unit)
      self._accumulate_counts("prompt", prompt_units, prompt_unit)
      self._accumulate_counts("response", response_units, response_unit)
      ref["evals"] += 1
      if self.reference_done:
        for side in ("prompt", "response"):
          ref[f"{side}_counts"] = d.cap_counts(ref[f"{side}_counts"], cfg["max_vocab"])

    m: dict[str, float] = {}
    proxy_mean, proxy_std = _moments(ref["proxy"])
    judge_mean, judge_std = _moments(ref["judge"])
    m["proxy_gain"] = d.standardised_gain(proxy, proxy_mean, proxy_std)
    m["judge_gain"] = d.standardised_gain(judge, judge_mean, judge_std)
    m["proxy_gold_gap"] = m["proxy_gain"] - m["judge_gain"]
    m["proxy_gold_gap_trend"] = d.slope(
      [h[PREFIX + "proxy_gold_gap"] for h in history] + [m["proxy_gold_gap"]],
      window=cfg["trend_window"],
      min_points=cfg["trend_min_points"],
    )

    m["ensemble_disagreement"] = d.finite_mean(spread) if spread is not None else d.NAN
    ref_disagreement = _loose(ref["disagreement_given"])
    if math.isnan(ref_disagreement):
      ref_disagreement = _ratio(ref["disagreement"])
    m["ensemble_disagreement_ratio"] = (
      m["ensemble_disagreement"] / ref_disagreement
      if math.isfinite(ref_disagreement) and ref_disagreement > 0
      else d.NAN
    )

    m["reward_length_corr"] = (
      d.reward_length_corr(proxy, lengths) if proxy.size == lengths.size else d.NAN
    )
    ref_length = _ratio(ref["length"]) if length_unit == ref["length_unit"] else d.NAN
    mean_length = d.finite_mean(lengths) if length_unit == ref["length_unit"] else d.NAN
    m["length_ratio"] = mean_length / ref_length if ref_length > 0 else d.NAN
    m["length_trend"] = d.relative_trend(
      [h["mean_length"] for h in history] + [mean_length],
      ref_length,
      cfg["trend_window"],
      cfg["trend_min_points"],
    )

    texts = responses if responses is not None else response_tokens
    texts = [] if texts is None else list(texts)
    m["repeat_ngram_frac"], m["repeat_ngram_rate"] = d.repetition(texts, cfg["repeat_n"])
    m["distinct_1"], m["distinct_2"] = d.distinct_n(texts, 1), d.distinct_n(texts, 2)

    latest_kl = d.finite_mean(kl) if kl is not None else d.NAN
    m["kl_spike_ratio"], m["kl_robust_z"] = d.kl_spike(
      [h["kl"] for h in history], latest_kl, cfg["kl_window"], cfg["kl_min_history"]
    )

    ref_entropy = _ratio(ref["entropy"])
    m["entropy_ratio"] = mean_entropy / ref_entropy if ref_entropy > 0 else d.NAN

    for side, batch, unit in (
      ("prompt", prompt_units, prompt_unit),
      ("response", response_units, response_unit),
    ):
      if batch is None or unit != ref[f"{side}_unit"]:
        m[f"{side}_jsd"] = m[f"{side}_psi"] = d.NAN
        continue
      batch_counts = collections.Counter()
      for seq in batch:
        batch_counts.update(seq)
      jsd, psi = d.frequency_drift(batch_counts, ref[f"{side}_counts"], cfg["psi_epsilon"])
      m[f"{side}_jsd"], m[f"{side}_psi"] = jsd, psi

    out = {name: float(m[name.removeprefix(PREFIX)]) for name in METRIC_NAMES}
    entry = {"step": step, "kl": d.NAN if in_reference else latest_kl, "mean_length": mean_length}
    self._history = [*history, {**entry, **out}][-cfg["history_size"] :]
    return out

  def _accumulate(self, step, proxy, judge, spread, mean_entropy, lengths, length_unit):
    ref = self._reference
    ref["steps"].append(step)
    for key, x in (("proxy", proxy), ("judge", judge)):
      x = x[np.isfinite(x)]
      acc = ref[key]
      ref[key] = [acc[0] + int(x.size), acc[1] + float(x.sum()), acc[2] + float(np.sum(x * x))]
    if spread is not None and spread.size:
      acc = ref["disagreement"]
      ref["disagreement"] = [acc[0] + int(spread.size), acc[1] + float(spread.sum())]
    if math.isfinite(mean_entropy):
      acc = ref["entropy"]
      ref["entropy"] = [acc[0] + 1, acc[1] + mean_entropy]
    if length_unit is not None and ref["length_unit"] in (None, length_unit):
      x = lengths[np.isfinite(lengths)]
      if x.size:
        acc = ref["length"]
        ref["length"] = [acc[0] + int(x.size), acc[1] + float(x.sum())]
        ref["length_unit"] = length_unit

  def _accumulate_counts(self, side: str, batch, unit) -> None:
    ref = self._reference
    if batch is None or ref[f"{side}_unit"] not in (None, unit):
      return
    ref[f"{side}_unit"] = unit
    for seq in batch:
      ref[f"{side}_counts"].update(seq)

  # --------------------------------------------------------------------------------- state

  @property
  def history(self) -> list[dict[str, float]]:
    """The kept evals: {"step", "kl", "mean_length", and the METRIC_NAMES} each."""
    return [dict(h) for h in self._history]

  def state_dict(self) -> dict[str, Any]:
    """The reference and the history as strict JSON (NaN as null; counts as [key, count]
    pairs, so token ids stay ints and words strings)."""
    ref = dict(self._reference)
    for side in ("prompt", "response"):
      ref[f"{side}_counts"] = [[k, c] for k, c in ref[f"{side}_counts"].items()]
    ref["steps"] = list(ref["steps"])
    history = [
      {k: _strict(v) if isinstance(v, float) else v for k, v in h.items()} for h in self._history
    ]
    return {"version": STATE_VERSION, "reference": ref, "history": history}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    """Restores `state_dict()` (as read back from JSON)."""
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"Monitor state version {state.get('version')!r}; expected {STATE_VERSION}.")
    ref = _empty_reference()
    saved = state["reference"]
    for key in ref:
      if key not in saved:
        continue
      if key.endswith("_counts"):
        ref[key] = collections.Counter({k: c for k, c in saved[key]})
      elif isinstance(ref[key], list):
        ref[key] = list(saved[key])
      else:
        ref[key] = saved[key]
    self._reference = ref
    self._history = [
      {k: v if k == "step" else _loose(v) for k, v in h.items()} for h in state["history"]
    ][-self.config["history_size"] :]


def _units(tokens, texts) -> tuple[list[list[Any]] | None, str | None]:
  """The batch as lists of units and their kind: token ids if given, else words of texts."""
  if tokens is not None:
    return [d.units(t) for t in tokens], "tokens"
  if texts is not None:
    return [d.words(t) for t in texts], "words"
  return None, None
