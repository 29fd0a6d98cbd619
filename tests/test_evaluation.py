"""The evaluation shared by the RL stages: win rate with its interval, distinct-n, judges."""

import re

import ml_collections
import numpy as np
import pytest

from rlhf_jax import config_spec as cs
from rlhf_jax import errors, evaluation
from rlhf_jax.data import testbed


def test_win_rate_interval_covers_and_is_reproducible():
  rng = np.random.default_rng(0)
  a, b = rng.normal(0.3, 1, 400), rng.normal(0, 1, 400)
  rate, low, high = evaluation.win_rate_interval(a, b)
  assert rate == pytest.approx(np.mean(a > b))
  assert low < rate < high and 0.05 < high - low < 0.15  # ~ 2 x 1.96 x sqrt(p(1-p)/n)
  assert evaluation.win_rate_interval(a, b) == (rate, low, high)
  # Ties count half; identical scores give exactly 1/2 with a zero-width interval.
  assert evaluation.win_rate_interval([1.0, 2.0], [1.0, 3.0])[0] == 0.25
  assert evaluation.win_rate_interval(a, a) == (0.5, 0.5, 0.5)
  with pytest.raises(ValueError, match="of one shape"):
    evaluation.win_rate_interval([1.0], [1.0, 2.0])


def test_distinct_n_matches_the_testbeds_on_its_language():
  responses = [r["response"] for r in testbed.sft_examples(50, seed=1)]
  for n in (1, 2, 3):
    assert evaluation.distinct_n(responses, n) == testbed.distinct_n(responses, n)
  assert evaluation.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
  assert evaluation.distinct_n([""], 2) == 0.0


def _config(judge, source="jsonl"):
  return ml_collections.ConfigDict(
    {"eval": {"judge": judge, "num_prompts": 4}, "data": {"source": source}}
  )


def length_judge(prompts, responses):
  return [float(len(r)) for r in responses]


def test_judges_resolve_and_refuse_with_the_key():
  assert evaluation.judge_name(_config("auto"), testbed_prompts=True) == "gold"
  assert evaluation.judge_name(_config("auto"), testbed_prompts=False) == "proxy"
  evaluation.check_judge(_config("tests.test_evaluation:length_judge"), "config", False)
  cases = [
    ("gold", "the gold reward exists only for the testbed's prompts"),
    ("rm:/no/such/dir", "config.eval.judge='rm:/no/such/dir': no such directory"),
    ("rm:", "names no directory"),
    ("no_such_module_zz:f", "cannot import 'no_such_module_zz'"),
    ("tests.test_evaluation:nothing", "has no function 'nothing'"),
    ("oracle", "expected one of auto, gold, proxy"),
  ]
  for judge, message in cases:
    with pytest.raises(cs.ConfigError, match=re.escape(message)):
      evaluation.check_judge(_config(judge), "config", testbed_prompts=False)


def test_function_judge_scores_are_checked():
  judge = evaluation.make_judge(
    _config("tests.test_evaluation:length_judge"),
    testbed_prompts=False,
    mesh=None,
    rules=None,
    max_len=8,
    batch_size=2,
  )
  np.testing.assert_array_equal(judge.fn(["p", "q"], ["ab", "c"]), [2.0, 1.0])
  with pytest.raises(errors.TrainingError, match="non-finite"):
    evaluation.host_scores(lambda p, r: [np.nan], "f", ["p"], ["r"])
  with pytest.raises(errors.TrainingError, match="shape"):
    evaluation.host_scores(lambda p, r: [1.0, 2.0], "f", ["p"], ["r"])
