"""The rater quality gate (rlhf_jax/data/quality_gate.py) on constructed labels."""

import math

import numpy as np
import pytest

from rlhf_jax import config_spec as cs
from rlhf_jax.data import quality_gate


def _labels(num_raters=6, items=40, random_raters=(), fast_raters=(), seed=0):
  """Every rater labels every item; raters in `random_raters` answer by a coin, the rest
  say "a" wins; `fast_raters` label every 5 s, the others every 30 s."""
  rng = np.random.default_rng(seed)
  records = []
  for r in range(num_raters):
    for i in range(items):
      a_wins = bool(rng.random() < 0.5) if r in random_raters else True
      a, b = f"response a{i}", f"response b{i}"
      records.append(
        {
          "prompt": f"p{i}",
          "chosen": a if a_wins else b,
          "rejected": b if a_wins else a,
          "tie": False,
          "rater_id": str(r),
          "pair_id": f"q{i}",
          "anchor": i < 10,
          "time": 1000.0 + i * (5.0 if r in fast_raters else 30.0),
        }
      )
  return records


def test_a_rater_answering_at_random_is_flagged_and_excluded():
  records = _labels(random_raters=(4,))
  gate = quality_gate.check(records, quality_gate.default_config())
  assert gate["flagged"] == ["4"] and gate["excluded"] == ["4"]
  assert gate["passed"]
  assert gate["raters"]["4"]["majority_agreement"] < 0.55
  assert any("majority_agreement" in why for why in gate["raters"]["4"]["why"])
  kept = quality_gate.keep(records, gate)
  assert len(kept) == 5 * 40 and all(r["rater_id"] != "4" for r in kept)
  # The others agree perfectly once rater 4 is out.
  assert gate["panel_agreement"] == 1.0


def test_flagged_but_kept_when_exclude_is_off():
  config = quality_gate.default_config()
  config.exclude = False
  gate = quality_gate.check(_labels(random_raters=(4,)), config)
  assert gate["flagged"] == ["4"] and gate["excluded"] == []
  assert gate["num_kept"] == gate["num_records"]


def test_fast_raters_are_flagged_only_when_the_speed_check_is_on():
  records = _labels(fast_raters=(2,))
  config = quality_gate.default_config()
  assert quality_gate.check(records, config)["flagged"] == []
  config.min_median_seconds = 10.0
  gate = quality_gate.check(records, config)
  assert gate["flagged"] == ["2"]
  assert gate["raters"]["2"]["median_seconds"] == 5.0
  assert gate["raters"]["0"]["median_seconds"] == 30.0


def test_a_noisy_panel_fails_the_floor_with_a_reason():
  records = _labels(random_raters=tuple(range(6)), seed=1)
  config = quality_gate.default_config()
  config.exclude = False
  gate = quality_gate.check(records, config)
  assert not gate["passed"]
  assert "min_panel_agreement" in gate["reasons"][0]
  assert gate["panel_agreement"] < 0.55


def test_excluding_everyone_fails():
  config = quality_gate.default_config()
  config.min_majority_agreement = 1.0  # only a perfect record passes; coin-flippers have none
  gate = quality_gate.check(_labels(random_raters=(0, 1, 2, 3, 4, 5), seed=2), config)
  assert gate["excluded"] == [str(r) for r in range(6)] and gate["num_kept"] == 0
  assert not gate["passed"]
  assert gate["reasons"] == ["every rater was excluded: no label is left to train on"]


def test_unknown_statistics_do_not_flag_unless_asked():
  # Two raters who share no item: nothing can be compared.
  records = [
    r for r in _labels(num_raters=2, items=10) if int(r["pair_id"][1:]) % 2 == int(r["rater_id"])
  ]
  for r in records:
    r["anchor"] = False
  config = quality_gate.default_config()
  gate = quality_gate.check(records, config)
  assert gate["flagged"] == []
  assert math.isnan(gate["raters"]["0"]["majority_agreement"])
  config.flag_unknown = True
  assert quality_gate.check(records, config)["flagged"] == ["0", "1"]


def test_kappa_to_panel_is_the_mean_of_finite_pairwise_kappas():
  matrix = np.array([[1.0, 0.5, np.nan], [0.5, 1.0, 0.1], [np.nan, 0.1, 1.0]])
  out = quality_gate.kappa_to_panel(matrix)
  assert out[0] == 0.5 and out[1] == pytest.approx(0.3) and out[2] == pytest.approx(0.1)


def test_scored_against_known_careless_raters():
  result = quality_gate.scored({"flagged": ["4", "7"]}, careless=[4, 9])
  assert result["precision"] == 0.5 and result["recall"] == 0.5
  assert math.isnan(quality_gate.scored({"flagged": []}, careless=[1])["precision"])


def test_thresholds_are_checked_with_the_config():
  config = quality_gate.default_config()
  config.min_majority_agreement = 1.5
  with pytest.raises(cs.ConfigError, match=r"gate\.min_majority_agreement=1\.5"):
    quality_gate.CONFIG_SPEC.validate(config, "gate")
