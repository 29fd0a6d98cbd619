"""Tests for the testbed's text-level evaluation helpers."""

import math

import pytest

from rlhf_jax.data import testbed


def test_distinct_n():
  responses = ["It is great.", "It is fine."]
  assert testbed.distinct_n(responses, 1) == pytest.approx(4 / 6)
  assert testbed.distinct_n(responses, 2) == pytest.approx(3 / 4)
  assert testbed.distinct_n(["great great great great"], 1) == pytest.approx(1 / 4)
  assert testbed.distinct_n(["It."], 2) == 0.0
  with pytest.raises(ValueError):
    testbed.distinct_n(responses, 0)


def test_length_stats():
  stats = testbed.length_stats(["It is fine.", "Overall, it boils water quickly.", "x"])
  assert stats == {"mean": 3.0, "std": pytest.approx(math.sqrt(8 / 3)), "min": 1.0,
                   "median": 3.0, "max": 5.0}  # fmt: skip
  assert math.isnan(testbed.length_stats([])["mean"])


def test_win_rate_counts_ties_half():
  assert testbed.win_rate([1.0, 0.0, 2.0, 3.0], [0.0, 1.0, 2.0, 1.0]) == pytest.approx(2.5 / 4)
  assert testbed.win_rate([1.0], [1.0]) == 0.5
  with pytest.raises(ValueError):
    testbed.win_rate([1.0, 2.0], [1.0])
