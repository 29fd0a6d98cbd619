"""Tests for the testbed rater panel: the preference model, its biases, ties, anchors, records."""

import collections
import itertools

import numpy as np
import pytest

from rlhf_jax.data import testbed
from rlhf_jax.data.testbed import lexicon
from rlhf_jax.data.testbed.raters import make_raters, sigmoid

FIELDS = {
  "prompt",
  "chosen",
  "rejected",
  "rater_id",
  "tie",
  "shown_order",
  "confidence",
  "time",
  "p_chosen",
  "gold_chosen",
  "gold_rejected",
  "anchor",
  "pair_id",
}


@pytest.fixture(scope="module")
def pairs():
  """2000 (prompt, a, b) triples of generator responses, with a != b."""
  language = testbed.Language(testbed.default_config().language)
  rng = np.random.default_rng(7)
  out = []
  for p in language.prompts("train", 2200, rng):
    a, b = language.sample_response(p, rng), language.sample_response(p, rng)
    if a != b:
      out.append((p, a, b))
  return out[:2000]


def panel_with(num_raters=4, tau=0.5, length_bias=0.0, position_bias=0.0, ties=0.0, eps=0.0):
  """A panel of identical raters (each knob a scalar), or per-rater if given a tuple."""
  config = testbed.default_config()

  def per_rater(value):
    return tuple(value) if isinstance(value, tuple) else (value,) * num_raters

  config.panel.num_raters = num_raters
  config.panel.taus = per_rater(tau)
  config.panel.length_biases = per_rater(length_bias)
  config.panel.position_biases = per_rater(position_bias)
  config.panel.tie_thresholds = per_rater(ties)
  config.panel.eps = per_rater(eps)
  return testbed.RaterPanel(config)


def agreement_with_gold(records):
  return np.mean([r["gold_chosen"] > r["gold_rejected"] for r in records if not r["tie"]])


def test_noiseless_unbiased_raters_follow_gold(pairs):
  records = panel_with(tau=1e-9).label(pairs, rng=0)
  decided = [r for r in records if r["gold_chosen"] != r["gold_rejected"]]
  assert len(decided) > 1500
  assert all(r["gold_chosen"] > r["gold_rejected"] for r in decided)
  assert all(r["p_chosen"] == 1.0 and r["confidence"] == 5 for r in decided)


def test_length_bias_makes_longer_responses_win_more_than_gold_says(pairs):
  tau = 0.5

  def longer_wins(records):
    """Realised fraction of longer-chosen, and the fraction gold alone would give."""
    realised, by_gold = [], []
    for r in records:
      lengths = lexicon.num_words(r["chosen"]), lexicon.num_words(r["rejected"])
      if lengths[0] != lengths[1]:
        long_gold, short_gold = (
          (r["gold_chosen"], r["gold_rejected"])
          if lengths[0] > lengths[1]
          else (r["gold_rejected"], r["gold_chosen"])
        )
        realised.append(lengths[0] > lengths[1])
        by_gold.append(sigmoid((long_gold - short_gold) / tau))
    return np.mean(realised), np.mean(by_gold)

  realised, by_gold = longer_wins(panel_with(tau=tau, length_bias=0.2).label(pairs, rng=0))
  assert realised > by_gold + 0.1
  realised, by_gold = longer_wins(panel_with(tau=tau).label(pairs, rng=0))
  assert abs(realised - by_gold) < 0.03


def test_position_bias_favours_the_first_shown(pairs):
  same = [(p, a, a) for p, a, _ in pairs]  # identical responses: only the position differs
  first_wins = [
    np.mean(
      [r["shown_order"] == "chosen_first" for r in panel_with(position_bias=b).label(same, 0)]
    )
    for b in (0.0, 1.0)
  ]
  assert abs(first_wins[0] - 0.5) < 0.04
  assert abs(first_wins[1] - sigmoid(1.0 / 0.5)) < 0.04


def test_careless_raters_agree_with_gold_about_half_the_time(pairs):
  panel = panel_with(num_raters=2, tau=0.3, eps=(1.0, 0.0))
  careless = panel.label(pairs, rng=0, rater_ids=[0] * len(pairs))
  careful = panel.label(pairs, rng=0, rater_ids=[1] * len(pairs))
  assert abs(agreement_with_gold(careless) - 0.5) < 0.04
  assert agreement_with_gold(careful) > 0.8
  assert all(r["p_chosen"] == 0.5 for r in careless)
  # Careless raters are faster.
  assert careless[-1]["time"] < careful[-1]["time"]


def test_ties_only_from_tie_declaring_raters_when_gold_is_close(pairs):
  threshold = 0.3
  panel = panel_with(num_raters=4, ties=(threshold, 0.0, threshold, 0.0))
  records = panel.label(pairs, rng=0)
  ties = [r for r in records if r["tie"]]
  assert len(ties) > 20
  assert {r["rater_id"] for r in ties} == {0, 2}
  for r in records:
    close = abs(r["gold_chosen"] - r["gold_rejected"]) < threshold
    assert r["tie"] == (close and r["rater_id"] in (0, 2))
  assert all(r["p_chosen"] == 0.5 and r["confidence"] == 1 for r in ties)


def test_anchor_pairs_are_labelled_by_every_rater():
  panel = testbed.RaterPanel()
  config = panel.config.panel
  records = panel.label_anchors(rng=0)
  assert all(r["anchor"] for r in records)
  assert len(records) == config.num_raters * config.num_anchor_pairs
  assert {(r["rater_id"], r["pair_id"]) for r in records} == set(
    itertools.product(range(config.num_raters), range(config.num_anchor_pairs))
  )
  for r in records:
    prompt, a, b = panel.anchor_pairs[r["pair_id"]]
    assert r["prompt"] == prompt and {r["chosen"], r["rejected"]} == {a, b}
  # The anchors are the panel's, not the rng's.
  assert testbed.RaterPanel().anchor_pairs == panel.anchor_pairs
  statistics = testbed.anchor_agreement(records)
  assert 0.5 < statistics["pairwise_agreement"] < 1.0
  assert sorted(statistics["gold_agreement_by_rater"]) == list(range(config.num_raters))


def test_records_are_consistent(pairs):
  panel = testbed.RaterPanel()
  records = panel.label(pairs[:500], rng=3)
  times = collections.defaultdict(list)
  for i, (r, (prompt, a, b)) in enumerate(zip(records, pairs[:500], strict=True)):
    assert set(r) == FIELDS
    assert r["pair_id"] == i and not r["anchor"] and r["prompt"] == prompt
    assert {r["chosen"], r["rejected"]} == {a, b}
    assert r["gold_chosen"] == testbed.gold_reward(prompt, r["chosen"])
    assert r["gold_rejected"] == testbed.gold_reward(prompt, r["rejected"])
    assert r["shown_order"] in ("chosen_first", "rejected_first")
    assert r["confidence"] in range(1, 6) and 0.0 <= r["p_chosen"] <= 1.0
    if not r["tie"]:
      # p_chosen is the rater's probability of the answer given, in the order shown.
      rater = panel.raters[r["rater_id"]]
      chosen_first = r["shown_order"] == "chosen_first"
      first, second = (r["chosen"], r["rejected"]) if chosen_first else (r["rejected"], r["chosen"])
      p_first = testbed.preference_probability(
        rater,
        testbed.gold_reward(prompt, first),
        testbed.gold_reward(prompt, second),
        lexicon.num_words(first),
        lexicon.num_words(second),
      )
      assert r["p_chosen"] == pytest.approx(p_first if chosen_first else 1 - p_first)
    times[r["rater_id"]].append(r["time"])
  assert all(np.all(np.diff(t) > 0) for t in times.values())
  assert len(times) == panel.config.panel.num_raters


def test_labels_are_deterministic_per_seed(pairs):
  panel = testbed.RaterPanel()
  assert panel.label(pairs[:200], rng=1) == panel.label(pairs[:200], rng=1)
  assert panel.label(pairs[:200], rng=1) != panel.label(pairs[:200], rng=2)
  first = testbed.preference_pairs(100, seed=0)
  assert first == testbed.preference_pairs(100, seed=0)
  assert first != testbed.preference_pairs(100, seed=1)


def test_preference_pairs_put_anchors_first():
  config = testbed.default_config()
  records = testbed.preference_pairs(50, seed=0, config=config)
  num_anchor = config.panel.num_raters * config.panel.num_anchor_pairs
  assert len(records) == num_anchor + 50
  assert all(r["anchor"] for r in records[:num_anchor])
  assert not any(r["anchor"] for r in records[num_anchor:])
  last_anchor = max(r["time"] for r in records[:num_anchor])
  assert min(r["time"] for r in records[num_anchor:]) > last_anchor
  assert len(testbed.preference_pairs(50, seed=0, include_anchors=False)) == 50
  with pytest.raises(ValueError, match="RaterPanel"):
    testbed.preference_pairs(5, seed=0, source="policy")


def test_rater_draws_respect_the_config():
  panel = testbed.default_config().panel
  raters = make_raters(panel)
  assert len(raters) == panel.num_raters
  for r in raters:
    assert panel.tau_min <= r.tau <= panel.tau_max
    assert panel.length_bias_min <= r.length_bias <= panel.length_bias_max
    assert panel.position_bias_min <= r.position_bias <= panel.position_bias_max
    assert r.tie_threshold in (0.0, panel.tie_threshold) and r.eps in (0.0, panel.careless_eps)
  assert sum(r.tie_threshold > 0 for r in raters) == round(panel.tie_fraction * panel.num_raters)
  assert sum(r.eps > 0 for r in raters) == round(panel.careless_fraction * panel.num_raters)
  assert make_raters(panel) == raters
  panel.seed = 1
  assert make_raters(panel) != raters
  # Overriding one knob keeps the other draws.
  panel.seed = 0
  panel.taus = (0.5,) * panel.num_raters
  overridden = make_raters(panel)
  assert [r.tau for r in overridden] == [0.5] * panel.num_raters
  assert [r.length_bias for r in overridden] == [r.length_bias for r in raters]
  panel.taus = (0.5,)
  with pytest.raises(ValueError, match="per-rater"):
    make_raters(panel)


def test_a_labelling_scores_each_distinct_response_once(pairs, monkeypatch):
  # K-wise pairs repeat each response K-1 times; the gold reward is computed once for it,
  # and the labels are what scoring every pair afresh gives.
  from rlhf_jax.data.testbed import raters

  prompt, a, b = pairs[0]
  c = pairs[1][1]
  triples = [(prompt, a, b), (prompt, a, c), (prompt, b, c)]
  panel = panel_with()
  rng, clocks = np.random.default_rng(3), panel._clocks(None)
  fresh = [
    panel._label_one(t, panel.raters[0], rng, clocks, pair_id=i, anchor=False)
    for i, t in enumerate(triples)
  ]
  scored = []
  real = raters.gold_lib.gold_reward
  monkeypatch.setattr(
    raters.gold_lib, "gold_reward", lambda p, r, config=None: scored.append(r) or real(p, r, config)
  )
  labels = panel.label(triples, np.random.default_rng(3), rater_ids=[0, 0, 0])
  assert sorted(scored) == sorted({a, b, c})
  assert labels == fresh
