"""Sweep statistics on hand-computed cases: t intervals, paired and Welch tests, Holm."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from rlhf_jax.sweeps import stats

nan = math.isnan


def test_summarize_is_a_student_t_interval():
  s = stats.summarize([1.0, 2.0, 3.0])
  assert (s["n"], s["n_nan"], s["mean"], s["std"]) == (3, 0, 2.0, 1.0)
  half = 4.302653 / math.sqrt(3)  # t_{0.975, 2} * std / sqrt(n)
  assert s["half_width"] == pytest.approx(half, rel=1e-6)
  assert (s["low"], s["high"]) == pytest.approx((2.0 - half, 2.0 + half), rel=1e-6)
  assert s["confidence"] == 0.95
  # A narrower confidence, a narrower interval.
  assert stats.summarize([1.0, 2.0, 3.0], 0.9)["half_width"] < half


def test_summarize_one_value_and_nan():
  one = stats.summarize([5.0])
  assert one["n"] == 1 and one["mean"] == 5.0
  assert all(nan(one[k]) for k in ("std", "sem", "half_width", "low", "high"))
  none = stats.summarize([])
  assert none["n"] == 0 and nan(none["mean"])
  # NaN (and inf) are counted and left out.
  s = stats.summarize([1.0, float("nan"), 3.0, float("inf")])
  assert (s["n"], s["n_nan"], s["mean"]) == (2, 2, 2.0)
  assert s["std"] == pytest.approx(math.sqrt(2))


def test_bootstrap_is_deterministic_and_inside_the_range():
  values = [1.0, 2.0, 3.0, 4.0, 10.0]
  low, high = stats.bootstrap_interval(values, seed=3)
  assert (low, high) == stats.bootstrap_interval(values, seed=3)
  assert 1.0 <= low < np.mean(values) < high <= 10.0
  assert stats.bootstrap_interval([2.0]) == (2.0, 2.0)
  assert all(nan(x) for x in stats.bootstrap_interval([float("nan")]))


def test_paired_difference_matches_scipy_ttest_rel():
  a = {1: 1.0, 2: 2.5, 3: 2.0, 4: 4.0, 5: 9.0}  # seed 5 only in a: left out
  b = {1: 0.5, 2: 1.0, 3: 1.9, 4: 2.0, 6: 7.0}
  d = stats.paired_difference(a, b)
  ref = sps.ttest_rel([1.0, 2.5, 2.0, 4.0], [0.5, 1.0, 1.9, 2.0])
  assert d["paired"] and d["test"] == "paired t" and d["n"] == 4
  assert d["mean"] == pytest.approx(1.025)
  assert d["p_value"] == pytest.approx(ref.pvalue)
  assert d["resolved"] == (ref.pvalue < 0.05)
  ci = ref.confidence_interval(0.95)
  assert (d["low"], d["high"]) == pytest.approx((ci.low, ci.high))
  assert d["reason"] is None


def test_pairing_resolves_what_welch_cannot():
  # A large seed effect shared by both arms; arm a is better by ~0.1 on every seed.
  seed_effect = {0: -3.0, 1: 0.0, 2: 4.0, 3: 1.0}
  a = {s: e + 0.1 + 0.01 * s for s, e in seed_effect.items()}
  b = {s: e for s, e in seed_effect.items()}
  paired = stats.paired_difference(a, b)
  assert paired["paired"] and paired["resolved"] and paired["low"] > 0
  # The same values with disjoint seed keys: Welch, swamped by the seed variance.
  welch = stats.paired_difference({("x", s): v for s, v in a.items()}, b)
  assert not welch["paired"] and welch["test"] == "Welch t" and welch["n"] == [4, 4]
  assert not welch["resolved"] and welch["low"] < 0 < welch["high"]
  assert welch["mean"] == pytest.approx(paired["mean"])


def test_welch_fallback_matches_scipy():
  a = {(0,): 1.0, (1,): 2.0, (2,): 4.0}
  b = {(10,): 0.0, (11,): 0.5, (12,): 0.2, (2,): 0.1}  # one shared seed: not enough to pair
  d = stats.paired_difference(a, b)
  ref = sps.ttest_ind([1.0, 2.0, 4.0], [0.0, 0.5, 0.2, 0.1], equal_var=False)
  assert not d["paired"] and d["n"] == [3, 4]
  assert d["p_value"] == pytest.approx(ref.pvalue)
  assert d["df"] == pytest.approx(ref.df)


def test_constant_differences_and_too_few_seeds():
  same = stats.paired_difference({1: 1.0, 2: 2.0}, {1: 0.5, 2: 1.5})
  assert same["p_value"] == 0.0 and same["resolved"] and same["low"] == same["high"] == 0.5
  zero = stats.paired_difference({1: 1.0, 2: 2.0}, {1: 1.0, 2: 2.0})
  assert zero["p_value"] == 1.0 and not zero["resolved"]
  few = stats.paired_difference({1: 1.0}, {1: 0.0, 2: 5.0})
  assert not few["resolved"] and nan(few["p_value"]) and "too few" in few["reason"]
  assert few["n"] == [1, 2] and few["mean"] == pytest.approx(-1.5)
  # A NaN seed counts as missing: one shared finite seed is too few to pair.
  d = stats.paired_difference({1: 1.0, 2: float("nan")}, {1: 0.0, 2: 1.0})
  assert not d["paired"] and nan(d["p_value"])


def test_holm_by_hand():
  # Sorted 0.01, 0.02, 0.04, 0.5 (m = 4): x4, x3, x2, x1 = .04, .06, .08, .5
  p = [0.04, 0.01, float("nan"), 0.5, 0.02]
  out = stats.holm(p)
  assert out[:2] == pytest.approx([0.08, 0.04])
  assert nan(out[2])
  assert out[3:] == pytest.approx([0.5, 0.06])
  # Monotone: a later scaled value smaller than an earlier one is raised to it; cap at 1.
  assert stats.holm([0.01, 0.011, 0.9]) == pytest.approx([0.03, 0.03, 0.9])
  assert stats.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])
  assert stats.holm([]) == []


def test_compare_all_pairs_or_against_a_baseline():
  rng = np.random.default_rng(0)
  groups = {
    name: {s: shift + float(rng.normal()) for s in range(3)}
    for name, shift in (("x", 0.0), ("y", 1.0), ("z", 2.0))
  }
  rows = stats.compare(groups)
  assert [(r["a"], r["b"]) for r in rows] == [("x", "y"), ("x", "z"), ("y", "z")]
  assert [r["p_holm"] for r in rows] == pytest.approx(stats.holm([r["p_value"] for r in rows]))
  for r in rows:
    assert r["resolved_holm"] == (r["p_holm"] < 0.05)
    assert r["p_holm"] >= r["p_value"]
  base = stats.compare(groups, baseline="y")
  assert [(r["a"], r["b"]) for r in base] == [("x", "y"), ("z", "y")]
  # Too many groups for all pairs: against the first.
  many = stats.compare(groups, max_all_pairs=2)
  assert [(r["a"], r["b"]) for r in many] == [("y", "x"), ("z", "x")]
  assert stats.compare({"x": groups["x"]}) == []
  with pytest.raises(ValueError, match="baseline"):
    stats.compare(groups, baseline="w")


def test_gao_fit_recovers_the_rl_curve_and_its_peak():
  d = np.linspace(0.2, 4.0, 12)
  gain = stats.gao_curve(d, 1.5, 0.6)
  fit = stats.fit_gao(d, gain)
  assert fit["alpha"] == pytest.approx(1.5) and fit["beta"] == pytest.approx(0.6)
  assert fit["r2"] == pytest.approx(1.0) and fit["n"] == 12
  assert fit["d_peak"] == pytest.approx(math.exp(1.5 / 0.6 - 1))
  grid = np.linspace(0.1, 10, 2000)
  assert fit["gain_peak"] == pytest.approx(stats.gao_curve(grid, 1.5, 0.6).max(), rel=1e-4)
  noisy = stats.fit_gao(d, gain + np.random.default_rng(0).normal(0, 0.1, d.size))
  assert 0.5 < noisy["r2"] < 1.0
  # The best-of-n form, points at d = 0 and NaN left out, too few points.
  bon = stats.fit_gao([0.0, 0.5, 1.0, 2.0, float("nan")], [0.0, 0.4375, 0.75, 1.0, 1.0], "bon")
  assert bon["n"] == 3 and bon["alpha"] == pytest.approx(1.0) and bon["beta"] == pytest.approx(0.25)
  assert bon["d_peak"] == pytest.approx(2.0) and bon["gain_peak"] == pytest.approx(1.0)
  assert math.isnan(stats.fit_gao([1.0, 2.0], [0.5, 0.7])["alpha"])
  rising = stats.fit_gao(d, 0.5 * d + 0.1 * d * np.log(d))  # no turn: beta < 0
  assert rising["beta"] < 0 and math.isnan(rising["d_peak"])
