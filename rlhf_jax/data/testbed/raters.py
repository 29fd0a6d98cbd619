"""The panel of simulated raters who label preference pairs from the gold reward.

Rater i is shown a pair in a random order (F first, S second) and prefers F with probability

  p_i(F) = eps_i / 2 + (1 - eps_i) * sigmoid((g(F) - g(S) + c_i * (L(F) - L(S)) + b_i) / tau_i)

g the gold reward, L the length in words, c_i the length bias, b_i the position bias (in
favour of whoever is shown first), tau_i the noise, eps_i the chance of answering at random
(careless raters). A tie-declaring rater (tie threshold t_i > 0) answers "tie" whenever
|g(F) - g(S)| < t_i, and otherwise as above. Per-rater values come from config.panel.

Each label is a record (a dict):

  prompt, chosen, rejected   the pair, after mapping the shown order and the answer; for a
                             tie, chosen and rejected are the pair as given (a, b)
  tie                        bool
  shown_order                "chosen_first" or "rejected_first"
  p_chosen                   the probability the rater's model gave to the answer it gave
                             (p_i of chosen over rejected; 0.5 for a tie), for the ceiling
  confidence                 rater-reported 1..5: 1 + round(4 * |2 p - 1|); 1 for a tie
  gold_chosen, gold_rejected gold rewards of the two responses
  rater_id, time             who labelled it and when (simulated unix seconds, increasing
                             per rater)
  anchor, pair_id            anchor pairs are calibration pairs shown to every rater; pair_id
                             indexes the anchor list, or the pairs passed to `label`
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections
import numpy as np

from rlhf_jax.data.testbed import gold as gold_lib
from rlhf_jax.data.testbed import lexicon
from rlhf_jax.data.testbed.config import default_config
from rlhf_jax.data.testbed.language import Language

# Careless raters also answer faster: one of the cues real annotation teams screen on.
_CARELESS_SPEEDUP = 3.0


@dataclasses.dataclass(frozen=True)
class Rater:
  """One simulated rater's parameters (see the module docstring for the model)."""

  rater_id: int
  tau: float
  length_bias: float
  position_bias: float
  tie_threshold: float
  eps: float
  seconds_per_label: float


def sigmoid(x: float) -> float:
  """Numerically stable logistic function."""
  if x >= 0:
    return 1.0 / (1.0 + math.exp(-x))
  z = math.exp(x)
  return z / (1.0 + z)


def preference_probability(
  rater: Rater, gold_first: float, gold_second: float, length_first: int, length_second: int
) -> float:
  """p_i(first shown preferred), eps mixture included; ties are decided separately."""
  margin = (
    gold_first
    - gold_second
    + rater.length_bias * (length_first - length_second)
    + rater.position_bias
  )
  # tau -> 0 is a deterministic rater; an exactly equal pair is then a coin flip.
  if margin == 0.0:
    p = 0.5
  else:
    p = sigmoid(margin / rater.tau) if rater.tau > 0 else float(margin > 0)
  return 0.5 * rater.eps + (1.0 - rater.eps) * p


def _per_rater(
  given: Sequence[float], low: float, high: float, n: int, rng: np.random.Generator, log=False
) -> np.ndarray:
  """Explicit per-rater values if given (length n), else n uniform draws in [low, high]."""
  # Drawn even when overridden, so overriding one knob leaves the other draws unchanged.
  draws = rng.uniform(size=n)
  if len(given):
    return _given(given, n)
  if log:
    return np.exp(np.log(low) + draws * (np.log(high) - np.log(low)))
  return low + draws * (high - low)


def _given(values: Sequence[float], n: int) -> np.ndarray:
  if len(values) != n:
    raise ValueError(f"Got {len(values)} per-rater values for {n} raters.")
  return np.asarray(values, dtype=np.float64)


def make_raters(panel: ml_collections.ConfigDict) -> list[Rater]:
  """The panel's raters, drawn from config.panel with panel.seed."""
  n = panel.num_raters
  if n < 1:
    raise ValueError(f"num_raters={n}; need at least one rater.")
  rng = np.random.default_rng(panel.seed)
  taus = _per_rater(panel.taus, panel.tau_min, panel.tau_max, n, rng, log=True)
  length = _per_rater(panel.length_biases, panel.length_bias_min, panel.length_bias_max, n, rng)
  position = _per_rater(
    panel.position_biases, panel.position_bias_min, panel.position_bias_max, n, rng
  )
  # Which raters declare ties and which are careless: independent seeded permutations.
  tie_raters = rng.permutation(n)[: round(panel.tie_fraction * n)]
  careless_raters = rng.permutation(n)[: round(panel.careless_fraction * n)]
  ties = np.zeros(n)
  ties[tie_raters] = panel.tie_threshold
  eps = np.zeros(n)
  eps[careless_raters] = panel.careless_eps
  if len(panel.tie_thresholds):
    ties = _given(panel.tie_thresholds, n)
  if len(panel.eps):
    eps = _given(panel.eps, n)
  if np.any(taus < 0) or np.any((eps < 0) | (eps > 1)) or np.any(ties < 0):
    raise ValueError("Need tau >= 0, 0 <= eps <= 1 and tie thresholds >= 0.")
  return [
    Rater(
      rater_id=i,
      tau=float(taus[i]),
      length_bias=float(length[i]),
      position_bias=float(position[i]),
      tie_threshold=float(ties[i]),
      eps=float(eps[i]),
      seconds_per_label=panel.seconds_per_label / (_CARELESS_SPEEDUP if eps[i] > 0 else 1.0),
    )
    for i in range(n)
  ]


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
  return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


class RaterPanel:
  """Simulated raters and their anchor pairs, from the testbed config (default if None).

  panel = RaterPanel()
  records = panel.label([(prompt, a, b), ...], rng=0)
  anchors = panel.label_anchors(rng=1)
  """

  def __init__(self, config: ml_collections.ConfigDict | None = None):
    self.config = config if config is not None else default_config()
    self.raters = make_raters(self.config.panel)
    # Anchors: fixed by the panel seed, independent of the rng passed to label().
    anchor_rng = np.random.default_rng([self.config.panel.seed, 1])
    language = Language(self.config.language)
    prompts = language.prompts("train", self.config.panel.num_anchor_pairs, anchor_rng)
    self.anchor_pairs: list[tuple[str, str, str]] = [
      (p, language.sample_response(p, anchor_rng), language.sample_response(p, anchor_rng))
      for p in prompts
    ]

  def gold(self, prompt: str, response: str) -> float:
    return gold_lib.gold_reward(prompt, response, self.config)

  def label(
    self,
    pairs: Iterable[tuple[str, str, str]],
    rng: np.random.Generator | int,
    rater_ids: Sequence[int] | None = None,
    start_time: float | None = None,
  ) -> list[dict[str, Any]]:
    """One label per (prompt, a, b) triple, each by a uniformly drawn rater (or rater_ids).

    Every rater's clock starts at start_time (config.panel.start_time if None).
    """
    pairs = list(pairs)
    rng = _as_rng(rng)
    if rater_ids is None:
      rater_ids = rng.integers(len(self.raters), size=len(pairs))
    elif len(rater_ids) != len(pairs):
      raise ValueError(f"{len(rater_ids)} rater ids for {len(pairs)} pairs.")
    clocks = self._clocks(start_time)
    gold = functools.lru_cache(maxsize=1 << 16)(self.gold)  # a K-wise prompt's responses recur
    return [
      self._label_one(pair, self.raters[int(r)], rng, clocks, pair_id=i, anchor=False, gold=gold)
      for i, (pair, r) in enumerate(zip(pairs, rater_ids, strict=True))
    ]

  def label_anchors(
    self, rng: np.random.Generator | int, start_time: float | None = None
  ) -> list[dict[str, Any]]:
    """Every anchor pair labelled by every rater (anchor=True), rater by rater."""
    rng = _as_rng(rng)
    clocks = self._clocks(start_time)
    return [
      self._label_one(pair, rater, rng, clocks, pair_id=i, anchor=True)
      for rater in self.raters
      for i, pair in enumerate(self.anchor_pairs)
    ]

  def _clocks(self, start_time: float | None) -> np.ndarray:
    """Per-rater simulated clocks [num_raters] float64, advanced as each rater labels."""
    start = self.config.panel.start_time if start_time is None else start_time
    return np.full(len(self.raters), float(start))

  def _label_one(
    self, pair, rater: Rater, rng, clocks: np.ndarray, pair_id: int, anchor: bool, gold=None
  ) -> dict[str, Any]:
    prompt, a, b = pair
    gold = gold or self.gold
    gold_a, gold_b = gold(prompt, a), gold(prompt, b)
    a_first = bool(rng.random() < 0.5)
    # Draw every random number for every label, so one rater's answer does not shift the
    # random stream of the labels after it.
    u_answer = rng.random()
    seconds = rng.exponential(rater.seconds_per_label)
    clocks[rater.rater_id] += seconds
    record = {
      "prompt": prompt,
      "rater_id": rater.rater_id,
      "time": float(clocks[rater.rater_id]),
      "anchor": anchor,
      "pair_id": pair_id,
    }
    if abs(gold_a - gold_b) < rater.tie_threshold:
      return {
        **record,
        "chosen": a,
        "rejected": b,
        "gold_chosen": gold_a,
        "gold_rejected": gold_b,
        "tie": True,
        "shown_order": "chosen_first" if a_first else "rejected_first",
        "p_chosen": 0.5,
        "confidence": 1,
      }
    first, second = (a, b) if a_first else (b, a)
    gold_first, gold_second = (gold_a, gold_b) if a_first else (gold_b, gold_a)
    p_first = preference_probability(
      rater, gold_first, gold_second, lexicon.num_words(first), lexicon.num_words(second)
    )
    first_wins = bool(u_answer < p_first)
    p = p_first if first_wins else 1.0 - p_first
    return {
      **record,
      "chosen": first if first_wins else second,
      "rejected": second if first_wins else first,
      "gold_chosen": gold_first if first_wins else gold_second,
      "gold_rejected": gold_second if first_wins else gold_first,
      "tie": False,
      "shown_order": "chosen_first" if first_wins else "rejected_first",
      "p_chosen": p,
      "confidence": 1 + round(4 * abs(2 * p - 1)),
    }
