"""The monitor's detectors on constructed data with known answers, and their NaN paths."""

import math

import numpy as np
import pytest

from rlhf_jax.monitor import detectors as d

nan = math.isnan


def test_standardised_gain_and_the_proxy_gold_gap():
  ref = dict(proxy_mean=1.0, proxy_std=2.0, judge_mean=10.0, judge_std=0.5)
  # The proxy gained 1 reference std (mean 3), the judge 0.5 of its own (mean 10.25).
  assert d.standardised_gain([2.0, 4.0], 1.0, 2.0) == 1.0
  assert d.proxy_gold_gap([2.0, 4.0], [10.0, 10.5], **ref) == pytest.approx(0.5)
  assert d.proxy_gold_gap([1.0, 1.0], [10.0, 10.0], **ref) == 0.0  # the reference itself
  # Falling judge, rising proxy: the gap exceeds the proxy's gain.
  assert d.proxy_gold_gap([3.0], [9.5], **ref) == pytest.approx(1.0 + 1.0)
  # Undefined: a constant reference, no scores.
  assert nan(d.standardised_gain([1.0], 0.0, 0.0))
  assert nan(d.proxy_gold_gap([], [1.0], **ref))
  assert nan(d.proxy_gold_gap([1.0], [1.0], **{**ref, "judge_std": float("nan")}))


def test_slope_of_a_line_is_its_slope():
  assert d.slope([1.0, 3.0, 5.0, 7.0]) == pytest.approx(2.0)
  assert d.slope([9.0, 9.0, 1.0, 2.0, 3.0], window=3) == pytest.approx(1.0)
  assert d.slope([0.0, 10.0, 40.0], x=[0, 10, 40]) == pytest.approx(1.0)
  assert d.slope([5.0, 5.0, 5.0]) == 0.0
  # Non-finite points are left out; fewer than 2 (or min_points) finite ones give NaN.
  assert d.slope([0.0, float("nan"), 2.0]) == pytest.approx(1.0)
  assert nan(d.slope([1.0]))
  assert nan(d.slope([]))
  assert nan(d.slope([1.0, 2.0], min_points=3))
  assert nan(d.slope([1.0, 2.0], x=[3.0, 3.0]))
  # Relative to a reference: +2 words per eval on a 20-word reference is +10% per eval.
  assert d.relative_trend([20.0, 22.0, 24.0], 20.0) == pytest.approx(0.1)
  assert nan(d.relative_trend([20.0, 22.0], 0.0))


def test_ensemble_disagreement_and_its_ratio():
  members = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])  # stds 1, 0, 1
  assert d.ensemble_disagreement(members) == pytest.approx(2 / 3)
  assert d.disagreement_ratio(members, 1 / 3) == pytest.approx(2.0)
  assert d.disagreement_ratio(2 * members, members) == pytest.approx(2.0)
  assert d.disagreement_ratio(members, members) == pytest.approx(1.0)
  # One member, no samples, a zero or missing reference: undefined.
  assert nan(d.ensemble_disagreement(members[:1]))
  assert nan(d.ensemble_disagreement(np.zeros((3, 0))))
  assert nan(d.ensemble_disagreement(None))
  assert nan(d.disagreement_ratio(members, 0.0))
  assert nan(d.disagreement_ratio(members, None))
  assert nan(d.disagreement_ratio(members, np.ones((2, 3))))


def test_pearson_of_a_length_driven_reward_is_one():
  lengths = np.array([10, 20, 35, 50, 80])
  assert d.reward_length_corr(0.1 * lengths - 3.0, lengths) == pytest.approx(1.0)
  assert d.reward_length_corr(-lengths, lengths) == pytest.approx(-1.0)
  rng = np.random.default_rng(0)
  x = rng.normal(size=2000)
  assert abs(d.pearson(x, rng.normal(size=2000))) < 0.1
  assert nan(d.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # a constant side
  assert nan(d.pearson([1.0], [2.0]))
  np.testing.assert_array_equal(d.word_lengths(["a b c", "", "Hello, world."]), [3, 0, 2])


def test_repetition_finds_a_repeated_phrase():
  looping = "I am happy to help. I am happy to help. I am happy to help."
  plain = "the quick brown fox jumps over the lazy dog"
  # "i am happy to help" x3 (15 words): 13 trigrams, 5 distinct.
  assert d.repeated_ngram_rate(looping, 3) == pytest.approx(8 / 13)
  assert d.repeated_ngram_rate(plain, 3) == 0.0
  assert d.repeated_ngram_rate(plain, 1) == pytest.approx(1 / 9)  # "the" twice
  assert d.repeated_ngram_rate("too short", 3) == 0.0
  assert d.repeated_ngram_rate([1, 2, 3, 1, 2, 3], 3) == pytest.approx(1 / 4)  # token ids
  frac, rate = d.repetition([looping, plain, plain, "hi"], n=3)
  assert frac == 0.25 and rate == pytest.approx(8 / 13 / 4)
  assert all(map(nan, d.repetition([], 3)))
  with pytest.raises(ValueError, match="n >= 1"):
    d.repeated_ngram_rate(plain, 0)


def test_distinct_n_pools_the_batch_like_the_eval_line():
  # Words as `evaluation.distinct_n` splits them: lowercase, without "." and ",".
  texts = ["a b a b", "Hello, world. Hello again", "x"]
  # Words: a b a b | hello world hello again | x: 9 words, 6 distinct.
  assert d.distinct_n(texts, 1) == pytest.approx(6 / 9)
  # Bigrams: ab ba ab | (hello world) (world hello) (hello again): 6, 5 distinct.
  assert d.distinct_n(texts, 2) == pytest.approx(5 / 6)
  assert d.distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)
  assert nan(d.distinct_n(["a"], 2))  # no bigram: NaN (the eval line says 0)


def test_kl_spike_of_a_constant_series_and_of_a_jump():
  assert d.kl_spike([2.0] * 5, 2.0) == (1.0, 0.0)
  ratio, z = d.kl_spike([2.0] * 5, 20.0)
  assert ratio == 10.0 and z > 100
  # Ordinary noise: ratio near 1, |z| small; the median and MAD ignore one earlier outlier.
  ratio, z = d.kl_spike([1.0, 1.1, 0.9, 50.0, 1.0], 1.05)
  assert ratio == pytest.approx(1.05) and abs(z) < 1
  # (latest - median) / (1.4826 MAD): history 1..5 has median 3 and MAD 1.
  assert d.kl_spike([1.0, 2.0, 3.0, 4.0, 5.0], 6.0)[1] == pytest.approx(3 / 1.4826)
  # Only the last `window` values count.
  assert d.kl_spike([100.0, 1.0, 1.0, 1.0], 1.0, window=3) == (1.0, 0.0)
  # Too little history, a NaN latest value, a zero median.
  assert all(map(nan, d.kl_spike([1.0, 1.0], 5.0)))
  assert all(map(nan, d.kl_spike([1.0] * 5, float("nan"))))
  ratio, z = d.kl_spike([0.0] * 5, 1.0)
  assert nan(ratio) and z > 1e6


def test_entropy_ratio_from_a_mean_or_per_token_entropies():
  assert d.entropy_ratio(1.0, 2.0) == 0.5
  per_token = np.array([[1.0, 3.0, 9.0], [2.0, 2.0, 9.0]])
  mask = np.array([[1, 1, 0], [1, 1, 0]])
  assert d.mean_entropy(per_token, mask) == 2.0
  assert d.entropy_ratio(per_token, 4.0, mask) == 0.5
  assert d.mean_entropy([1.0, float("nan"), 3.0]) == 2.0
  assert nan(d.entropy_ratio(1.0, 0.0))
  assert nan(d.entropy_ratio(1.0, None))
  assert nan(d.entropy_ratio([], 1.0))


def test_jsd_and_psi_known_values():
  p = np.array([0.5, 0.5, 0.0])
  assert d.jsd(p, p) == 0.0 and d.psi(p, p) == 0.0
  assert d.jsd([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)  # disjoint: 1 bit
  # JSD([1, 0], [1/2, 1/2]): m = (3/4, 1/4).
  expected = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5 * math.log2(2))
  assert d.jsd([1.0, 0.0], [0.5, 0.5]) == pytest.approx(expected)
  assert d.jsd([2.0, 2.0], [1.0, 1.0]) == 0.0  # normalised here
  # PSI = sum (p - q) ln(p / q); an empty bin is floored at epsilon.
  assert d.psi([0.6, 0.4], [0.5, 0.5]) == pytest.approx(0.1 * math.log(1.2) - 0.1 * math.log(0.8))
  assert d.psi([1.0, 0.0], [0.0, 1.0], epsilon=1e-4) == pytest.approx(
    2 * (1 - 1e-4) * math.log(1e4)
  )
  assert nan(d.jsd([], [])) and nan(d.psi([0.0], [1.0]))


def test_frequency_drift_of_texts_and_token_ids():
  ref = d.counts(["the cat sat", "the dog sat"])
  assert d.frequency_drift(["the dog sat", "the cat sat"], ref) == (0.0, 0.0)
  jsd, psi = d.frequency_drift(["zebra quokka"], ref)
  assert jsd == pytest.approx(1.0) and psi > 10
  jsd, psi = d.frequency_drift(["the cat sat the cat sat"], ref)
  assert 0 < jsd < 1 and psi > 0
  assert d.frequency_drift([[1, 2, 3]], d.counts([[3, 2, 1]])) == (0.0, 0.0)
  assert all(map(nan, d.frequency_drift([], ref)))
  assert all(map(nan, d.frequency_drift(["a"], {})))


def test_a_capped_reference_pools_the_rest_into_one_bin():
  full = d.counts(["a a a a b b b c c d"])
  capped = d.cap_counts(full, 2)
  assert capped == {"a": 4, "b": 3, d.OTHER: 3}
  assert d.cap_counts(full, 10) == full
  # Unseen items fall into the OTHER bin: c and e (3 of 8) against the reference's 3 of 10.
  p, q = d.aligned(d.counts(["a a a b b c e e"]), capped)
  np.testing.assert_allclose(p, [3 / 8, 2 / 8, 3 / 8])
  np.testing.assert_allclose(q, [0.4, 0.3, 0.3])
  assert d.frequency_drift(["a a a a b b b c c d"], capped) == (0.0, 0.0)


def test_unpad_and_units():
  tokens = np.array([[5, 6, 0], [7, 0, 0]])
  assert d.unpad(tokens, tokens > 0) == [[5, 6], [7]]
  assert d.units("Hello, World!") == ["hello", "world", "!"]
  assert d.units(np.array([1, 2])) == [1, 2]
  with pytest.raises(ValueError, match="one shape"):
    d.unpad(tokens, tokens[:1])
