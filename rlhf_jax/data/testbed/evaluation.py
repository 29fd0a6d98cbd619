"""Text-level evaluation helpers: distinct-n, response length, win rate. Pure functions.

Words are lexicon tokens without "." and ",", the unit the gold reward's length uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlhf_jax.data.testbed import lexicon


def _words(text: str) -> list[str]:
  return [t for t in lexicon.tokenize(text) if t not in lexicon.PUNCTUATION]


def distinct_n(responses: Sequence[str], n: int) -> float:
  """Distinct word n-grams over all n-grams, pooled over responses (0 if there are none)."""
  if n < 1:
    raise ValueError(f"n={n}; expected n >= 1.")
  grams = [
    tuple(words[i : i + n]) for words in map(_words, responses) for i in range(len(words) - n + 1)
  ]
  return len(set(grams)) / len(grams) if grams else 0.0


def length_stats(responses: Sequence[str]) -> dict[str, float]:
  """Mean, std, min, median and max response length in words (NaN for no responses)."""
  lengths = np.array([len(_words(r)) for r in responses], dtype=np.float64)
  if not lengths.size:
    return dict.fromkeys(("mean", "std", "min", "median", "max"), float("nan"))
  return {
    "mean": float(lengths.mean()),
    "std": float(lengths.std()),
    "min": float(lengths.min()),
    "median": float(np.median(lengths)),
    "max": float(lengths.max()),
  }


def win_rate(gold_a: Sequence[float] | np.ndarray, gold_b: Sequence[float] | np.ndarray) -> float:
  """Fraction of pairs where a beats b, ties counting half: gold_a [N], gold_b [N] -> float."""
  a, b = np.asarray(gold_a, dtype=np.float64), np.asarray(gold_b, dtype=np.float64)
  if a.shape != b.shape or a.ndim != 1 or not a.size:
    raise ValueError(f"Need two non-empty [N] arrays of one shape; got {a.shape}, {b.shape}.")
  return float(np.mean((a > b) + 0.5 * (a == b)))
