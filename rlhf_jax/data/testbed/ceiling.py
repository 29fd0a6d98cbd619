"""Noise ceiling and rater agreement of a labelled pair set (records from raters.py).

The testbed knows the probability p with which the labelling rater gave each answer
(record["p_chosen"]), so for a non-tie record:

  Bayes-optimal accuracy      max(p, 1 - p): the expected accuracy of the best possible
                              predictor of this label, one that knows the rater, the order
                              shown and the gold reward. No reward model can beat the mean
                              of this in expectation.
  Bayes-optimal log loss      H(p) = -p log p - (1 - p) log(1 - p), nats: the lowest expected
                              Bradley-Terry loss on this label.
  gold ordering, realised     1 if gold_chosen > gold_rejected, 1/2 if equal, else 0.
  gold ordering, expected     p if gold prefers the chosen one, 1 - p if it prefers the
                              rejected one, 1/2 if equal: the accuracy the gold reward itself
                              would have, averaged over the raters' randomness.

Ties are left out of every accuracy and loss above (a tie has no right answer to predict;
a Bradley-Terry model trained with tie target 1/2 is equally right on all of them) and
reported as `tie_fraction`. Averages over no records are NaN.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _gold_order(record: dict[str, Any]) -> float:
  """1 if gold prefers chosen, 0 if rejected, 0.5 if equal."""
  diff = record["gold_chosen"] - record["gold_rejected"]
  return 0.5 if diff == 0 else float(diff > 0)


def _mean(values: Sequence[float]) -> float:
  return float(np.mean(values)) if len(values) else math.nan


def _entropy(p: float) -> float:
  return -sum(q * math.log(q) for q in (p, 1.0 - p) if q > 0)


def noise_ceiling(records: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Bayes-optimal and gold-ordering accuracies of a labelled set (see the module docstring).

  records: label records with p_chosen, gold_chosen, gold_rejected and tie.
  """
  labels = [r for r in records if not r["tie"]]
  p = [r["p_chosen"] for r in labels]
  gold = [_gold_order(r) for r in labels]
  return {
    "num_records": len(records),
    "tie_fraction": (len(records) - len(labels)) / len(records) if records else math.nan,
    "bayes_accuracy": _mean([max(q, 1.0 - q) for q in p]),
    "bayes_log_loss": _mean([_entropy(q) for q in p]),
    "gold_accuracy": _mean(gold),
    "gold_expected_accuracy": _mean(
      [q * g + (1.0 - q) * (1.0 - g) if g != 0.5 else 0.5 for q, g in zip(p, gold, strict=True)]
    ),
  }


def anchor_agreement(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Agreement statistics on the anchor records (ties left out).

  Returns pairwise_agreement (fraction of rater pairs, over all anchors, who chose the same
  response) and per rater id: agreement with gold and with the majority of the other raters
  (a rater with no comparable anchor labels is left out).
  """
  by_pair: dict[int, dict[int, str]] = collections.defaultdict(dict)
  gold_agree: dict[int, list[float]] = collections.defaultdict(list)
  for r in records:
    if r["anchor"] and not r["tie"]:
      by_pair[r["pair_id"]][r["rater_id"]] = r["chosen"]
      gold_agree[r["rater_id"]].append(_gold_order(r))
  pairwise: list[float] = []
  majority_agree: dict[int, list[float]] = collections.defaultdict(list)
  for choices in by_pair.values():
    for a, b in itertools.combinations(sorted(choices), 2):
      pairwise.append(float(choices[a] == choices[b]))
    for rater, choice in choices.items():
      others = [c for other, c in choices.items() if other != rater]
      if others:
        same = sum(c == choice for c in others)
        # Majority of the others; an even split counts half.
        majority_agree[rater].append(
          0.5 if 2 * same == len(others) else float(2 * same > len(others))
        )
  return {
    "pairwise_agreement": _mean(pairwise),
    "gold_agreement_by_rater": {k: _mean(v) for k, v in sorted(gold_agree.items())},
    "majority_agreement_by_rater": {k: _mean(v) for k, v in sorted(majority_agree.items())},
  }
