"""Tests for the testbed noise ceiling and agreement statistics."""

import math

import numpy as np
import pytest

from rlhf_jax.data import testbed


def _record(p, gold_chosen, gold_rejected, tie=False):
  return {"p_chosen": p, "gold_chosen": gold_chosen, "gold_rejected": gold_rejected, "tie": tie}


def test_hand_worked_ceiling():
  records = [
    _record(0.9, 1.0, 0.0),  # gold agrees with the label
    _record(0.2, 1.0, 0.0),  # gold agrees with an unlikely label
    _record(0.6, 0.0, 1.0),  # gold disagrees
    _record(0.5, 1.0, 1.0),  # gold indifferent
    _record(0.5, 1.0, 1.1, tie=True),  # left out
  ]
  c = testbed.noise_ceiling(records)
  assert c["num_records"] == 5 and c["tie_fraction"] == pytest.approx(0.2)
  assert c["bayes_accuracy"] == pytest.approx((0.9 + 0.8 + 0.6 + 0.5) / 4)
  assert c["gold_accuracy"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
  assert c["gold_expected_accuracy"] == pytest.approx((0.9 + 0.2 + 0.4 + 0.5) / 4)
  entropy = lambda p: -p * math.log(p) - (1 - p) * math.log(1 - p)
  assert c["bayes_log_loss"] == pytest.approx(
    (entropy(0.9) + entropy(0.2) + entropy(0.6) + math.log(2)) / 4
  )


def test_empty_and_all_tie_sets_give_nan():
  assert math.isnan(testbed.noise_ceiling([])["bayes_accuracy"])
  c = testbed.noise_ceiling([_record(0.5, 0, 0, tie=True)])
  assert c["tie_fraction"] == 1.0 and math.isnan(c["gold_accuracy"])


@pytest.fixture(scope="module")
def pairs():
  language = testbed.Language(testbed.default_config().language)
  rng = np.random.default_rng(11)
  return [
    (p, language.sample_response(p, rng), language.sample_response(p, rng))
    for p in language.prompts("train", 3000, rng)
  ]


def _panel(tau):
  config = testbed.default_config()
  config.panel.taus = (tau,) * config.panel.num_raters
  return testbed.RaterPanel(config)


def test_ceiling_decreases_as_raters_get_noisier(pairs):
  ceilings = [testbed.noise_ceiling(_panel(tau).label(pairs, rng=0)) for tau in (0.1, 0.5, 1, 2)]
  bayes = [c["bayes_accuracy"] for c in ceilings]
  assert all(0.5 < b < 1.0 for b in bayes)
  assert np.all(np.diff(bayes) < -0.02)
  for c in ceilings:
    assert c["gold_expected_accuracy"] <= c["bayes_accuracy"] + 1e-12
    assert c["bayes_log_loss"] < math.log(2)


def test_realised_gold_accuracy_matches_its_expectation(pairs):
  c = testbed.noise_ceiling(testbed.RaterPanel().label(pairs, rng=0))
  standard_error = math.sqrt(0.25 / (c["num_records"] * (1 - c["tie_fraction"])))
  assert abs(c["gold_accuracy"] - c["gold_expected_accuracy"]) < 3 * standard_error
  # The default panel's gold ordering is good but leaves visible label noise.
  assert 0.7 < c["gold_expected_accuracy"] < 0.9


def test_anchor_agreement_hand_worked():
  def anchor(rater, pair, chosen, gold_chosen=1.0, tie=False):
    return {
      "anchor": True,
      "tie": tie,
      "pair_id": pair,
      "rater_id": rater,
      "chosen": chosen,
      "gold_chosen": gold_chosen,
      "gold_rejected": 0.0,
    }

  records = [
    anchor(0, 0, "a"),
    anchor(1, 0, "a"),
    anchor(2, 0, "b", gold_chosen=-1.0),
    anchor(0, 1, "c"),
    anchor(1, 1, "c"),
    anchor(2, 1, "c", tie=True),  # left out
    {**anchor(2, 1, "c"), "anchor": False},  # not an anchor
  ]
  stats = testbed.anchor_agreement(records)
  # Pair 0: (0,1) agree, (0,2) and (1,2) do not; pair 1: (0,1) agree.
  assert stats["pairwise_agreement"] == pytest.approx(2 / 4)
  assert stats["gold_agreement_by_rater"] == {0: 1.0, 1: 1.0, 2: 0.0}
  assert stats["majority_agreement_by_rater"] == {0: 0.75, 1: 0.75, 2: 0.0}
