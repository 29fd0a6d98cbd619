"""Monitor: the detectors per eval against the step-0 reference, its config and JSON state."""

import json
import math

import numpy as np
import pytest

from rlhf_jax import config_spec as cs
from rlhf_jax import monitor
from tests.monitor import synthetic


def _series(outputs, name):
  return np.array([o[name] for o in outputs])


def _same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key


def test_the_reference_eval_reads_zero_gap_and_unit_ratios():
  out = monitor.Monitor().update(0, **synthetic.eval_inputs(0, "overopt"))
  assert tuple(out) == monitor.METRIC_NAMES
  assert out["monitor/proxy_gold_gap"] == pytest.approx(0.0, abs=1e-12)
  for name in ("ensemble_disagreement_ratio", "length_ratio", "entropy_ratio"):
    assert out[f"monitor/{name}"] == pytest.approx(1.0)
  for name in ("prompt_jsd", "response_jsd", "response_psi"):
    assert out[f"monitor/{name}"] == 0.0
  # Trends and KL spikes need history.
  for name in ("proxy_gold_gap_trend", "length_trend", "kl_spike_ratio", "kl_robust_z"):
    assert math.isnan(out[f"monitor/{name}"])


def test_over_optimisation_raises_the_gap_and_length_metrics_and_benign_keeps_them_flat():
  over = synthetic.run(monitor.Monitor(), "overopt")
  benign = synthetic.run(monitor.Monitor(), "benign")
  late = slice(7, None)  # past the judge's peak (eval 5)

  gap = _series(over, "monitor/proxy_gold_gap")
  assert gap[-1] > 3 and np.all(np.diff(gap[5:]) > 0)
  assert np.all(_series(over, "monitor/proxy_gold_gap_trend")[late] > 0.3)
  assert np.all(_series(over, "monitor/length_trend")[2:] > 0.15)
  assert _series(over, "monitor/length_ratio")[-1] > 3
  assert np.all(_series(over, "monitor/reward_length_corr") > 0.5)
  repeat = _series(over, "monitor/repeat_ngram_frac")
  assert repeat[-1] - repeat[0] > 0.8
  assert _series(over, "monitor/distinct_2")[-1] < 0.5
  assert _series(over, "monitor/ensemble_disagreement_ratio")[-1] > 2
  assert _series(over, "monitor/response_jsd")[-1] > 0.35
  assert _series(over, "monitor/entropy_ratio")[-1] < 0.3
  spike = _series(over, "monitor/kl_spike_ratio")
  assert spike[9] > 10 and np.all(spike[4:9] < 2.5)  # the jump at eval 9 only

  assert np.all(np.abs(_series(benign, "monitor/proxy_gold_gap")) < 0.5)
  assert np.all(np.abs(_series(benign, "monitor/proxy_gold_gap_trend")[2:]) < 0.15)
  assert np.all(np.abs(_series(benign, "monitor/length_trend")[2:]) < 0.05)
  assert np.all(np.abs(_series(benign, "monitor/reward_length_corr")) < 0.5)
  assert np.all(_series(benign, "monitor/repeat_ngram_frac") < 0.05)
  assert np.all(np.abs(_series(benign, "monitor/ensemble_disagreement_ratio") - 1) < 0.3)
  assert np.all(_series(benign, "monitor/response_jsd") < 0.15)
  assert np.all(_series(benign, "monitor/kl_spike_ratio")[4:] < 2.5)
  assert np.all(_series(benign, "monitor/prompt_jsd") == 0.0)  # the same eval prompts


def test_missing_inputs_give_nan_metrics_not_errors():
  mon = monitor.Monitor()
  for step in (0, 10):
    out = mon.update(step)
    assert tuple(out) == monitor.METRIC_NAMES and all(math.isnan(v) for v in out.values())
  # Only texts: the text metrics are defined, the score metrics are not.
  mon = monitor.Monitor()
  mon.update(0, responses=["a b c"] * 4)
  out = mon.update(10, responses=["a b c a b c"] * 4)
  assert out["monitor/repeat_ngram_frac"] == 1.0 and out["monitor/length_ratio"] == 2.0
  assert math.isnan(out["monitor/proxy_gold_gap"]) and math.isnan(out["monitor/prompt_jsd"])
  # A one-member ensemble has no disagreement; a judge missing at step 0 no judge gain.
  mon = monitor.Monitor()
  mon.update(0, proxy=[0.0, 1.0], member_scores=[[0.0, 1.0]])
  out = mon.update(10, proxy=[1.0, 2.0], judge=[1.0, 2.0], member_scores=[[1.0, 2.0]])
  assert out["monitor/proxy_gain"] == 2.0
  assert math.isnan(out["monitor/judge_gain"]) and math.isnan(out["monitor/proxy_gold_gap"])
  assert math.isnan(out["monitor/ensemble_disagreement_ratio"])


def test_units_must_match_the_references():
  # The reference counted token lengths and token ids; later words are not comparable.
  mon = monitor.Monitor()
  mon.update(0, responses=["a b"], lengths=[5], response_tokens=[[1, 2, 3]])
  out = mon.update(10, responses=["a b c d"], lengths=[10], response_tokens=[[1, 2, 3]])
  assert out["monitor/length_ratio"] == 2.0 and out["monitor/response_jsd"] == 0.0
  out = mon.update(20, responses=["a b c d"])
  assert math.isnan(out["monitor/length_ratio"]) and math.isnan(out["monitor/response_jsd"])


def test_reference_pools_the_first_evals_and_an_explicit_disagreement_wins():
  section = monitor.monitor_section()
  section.reference_evals = 2
  mon = monitor.Monitor(section)
  mon.update(0, proxy=[0.0, 0.0], judge=[0.0, 0.0])
  assert not mon.reference_done
  mon.update(10, proxy=[2.0, 2.0], judge=[0.0, 2.0])
  assert mon.reference_done
  # Pooled proxy: mean 1, std 1; judge: mean 0.5, std sqrt(0.75).
  out = mon.update(20, proxy=[3.0], judge=[0.5])
  assert out["monitor/proxy_gain"] == pytest.approx(2.0)
  assert out["monitor/judge_gain"] == pytest.approx(0.0)

  members = np.array([[0.0, 0.0], [1.0, 1.0]])  # disagreement 0.5
  mon = monitor.Monitor(reference_disagreement=0.25)
  assert mon.update(0, member_scores=members)["monitor/ensemble_disagreement_ratio"] == 2.0
  mon = monitor.Monitor()
  mon.set_reference_disagreement(2 * members)
  assert mon.update(0, member_scores=members)["monitor/ensemble_disagreement_ratio"] == 0.5


def test_per_token_entropies_and_per_sample_kl():
  mon = monitor.Monitor()
  entropy, mask = np.array([[2.0, 2.0, 0.0]]), np.array([[1, 1, 0]])
  mon.update(0, entropy=entropy, entropy_mask=mask, kl=[0.0, 0.0])
  for step in (10, 20, 30):
    out = mon.update(step, entropy=[[0.5, 1.5]], kl=[1.0, 3.0])  # means 1 and 2
  assert out["monitor/entropy_ratio"] == 0.5
  # kl_min_history = 3 earlier KLs, and the step-0 KL (0 by construction) is not one.
  assert math.isnan(out["monitor/kl_spike_ratio"])
  assert mon.update(40, kl=[2.0, 6.0])["monitor/kl_spike_ratio"] == 2.0


def test_state_round_trip_gives_identical_later_outputs():
  section = monitor.monitor_section()
  section.max_vocab = 50  # a capped reference, with its OTHER bin
  first = monitor.Monitor(section)
  synthetic.run(first, "overopt", range(6))
  state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
  second = monitor.Monitor(section)
  second.load_state_dict(state)
  assert second.state_dict() == state
  for a, b in zip(
    synthetic.run(first, "overopt", range(6, 12)),
    synthetic.run(second, "overopt", range(6, 12)),
    strict=True,
  ):
    _same(a, b)
  # Token-id counts stay ints through JSON.
  mon = monitor.Monitor()
  mon.update(0, response_tokens=[[1, 2, 2]])
  restored = monitor.Monitor()
  restored.load_state_dict(json.loads(json.dumps(mon.state_dict())))
  assert restored.update(10, response_tokens=[[2, 1, 2]])["monitor/response_jsd"] == 0.0
  with pytest.raises(ValueError, match="version"):
    restored.load_state_dict({"version": 99})


def test_an_eval_repeated_after_a_resume_replaces_its_history():
  once, twice = monitor.Monitor(), monitor.Monitor()
  synthetic.run(once, "overopt", range(8))
  synthetic.run(twice, "overopt", range(8))
  synthetic.run(twice, "overopt", range(5, 8))  # resumed from step 40: evals 50..70 again
  assert [h["step"] for h in twice.history] == [h["step"] for h in once.history]
  _same(
    once.update(80, **synthetic.eval_inputs(8, "overopt")),
    twice.update(80, **synthetic.eval_inputs(8, "overopt")),
  )


def test_history_is_bounded():
  section = monitor.monitor_section()
  section.history_size = 6
  mon = monitor.Monitor(section)
  for step in range(20):
    mon.update(step, kl=1.0)
  assert [h["step"] for h in mon.history] == list(range(14, 20))


def test_config_section_defaults_and_checks():
  section = monitor.monitor_section()
  monitor.CONFIG_SPEC.validate(section, "config.monitor")
  assert section.enabled and section.repeat_n == 3 and "kl_spike" in section.alerts
  assert monitor.Monitor(section).config["trend_window"] == 5
  section.history_size = 4
  with pytest.raises(cs.ConfigError, match=r"^config.monitor.history_size=4: must be >= 6"):
    monitor.Monitor(section)
  section = monitor.monitor_section()
  section.repeat_n = 0
  with pytest.raises(cs.ConfigError, match=r"^config.monitor.repeat_n=0: must be an int >= 1"):
    monitor.Monitor(section)
  section = monitor.monitor_section()
  section.enabled = False
  assert monitor.Monitor(section).update(0, proxy=[1.0]) == {}
