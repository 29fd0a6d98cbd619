"""Shared pieces of the policy optimisers that need no trained stage."""

import time

import pytest

from rlhf_jax.trainers import common


def test_stage_clock_counts_setup_and_earlier_runs():
  # A trainer starts the clock after its setup (data, reference log-probs): the setup counts.
  start = time.perf_counter() - 5.0
  clock = common.StageClock(10.0, start=start)
  assert clock.elapsed() == pytest.approx(15.0, abs=0.5)
  fresh = common.StageClock()
  assert 0.0 <= fresh.elapsed() < 0.5
  assert common.StageClock(7.0).elapsed() == pytest.approx(7.0, abs=0.5)
