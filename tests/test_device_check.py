"""benchmarks/device_check.sh at the tiny size: the script a lent GPU/TPU runs, known to work.

It runs as a subprocess, as on the lent machine (the wrapper script, its own pytest for the
correctness step, JSON lines on stdout), on CPU. Timings at this size mean nothing: only
that every figure comes out, well formed, with values in range.
"""

import json
import os
import subprocess
import sys
import types

import pytest

from benchmarks import device_check
from rlhf_jax import config_utils, metrics
from tests import shared

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Cluster variables would switch on jax.distributed in a child; CI may run inside SLURM.
_CLUSTER_VARS = (
  *config_utils._DISTRIBUTED_ENV_VARS,
  *config_utils._DISTRIBUTED_COUNT_VARS,
  *config_utils._TPU_HOST_LIST_VARS,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """The script's JSON lines by figure, run once per test run (also under xdist)."""
  return shared.once(tmp_path_factory, "device_check_tiny", lambda _: _run_tiny())


def _run_tiny():
  env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_VARS}
  env["JAX_PLATFORMS"] = "cpu"
  # One CPU device for the figures (a third faster to compile than conftest's 8 fake ones);
  # the correctness step's own pytest gets its 8 from conftest again.
  flags = env.get("XLA_FLAGS", "").split()
  env["XLA_FLAGS"] = " ".join(f for f in flags if "xla_force_host_platform_device_count" not in f)
  env["PYTHON"] = sys.executable
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
  result = subprocess.run(
    ["bash", os.path.join(REPO_ROOT, "benchmarks", "device_check.sh"), "--size=tiny"],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-5000:]
  # Every stdout line is JSON: logs and pytest's report go to stderr.
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  return {line.get("figure") or line.get("check"): line for line in lines}


def test_every_figure_in_order_and_only_those(tiny_run):
  assert list(tiny_run) == ["correctness", "train_step", "decode", "ppo_iteration"]
  assert all(line["size"] == "tiny" and "error" not in line for line in tiny_run.values())


def test_correctness_ran_the_tests_and_none_failed(tiny_run):
  line = tiny_run["correctness"]
  assert line["passed"] == 2 and line["failed"] == 0 and line["returncode"] == 0
  assert line["platform"] == "cpu"


def test_train_step_figures_are_sane(tiny_run):
  line = tiny_run["train_step"]
  assert line["dtype"] == "bfloat16" and line["param_dtype"] == "float32"
  assert line["tokens_per_s"] > 0 and line["step_s"] > 0 and line["flops_per_step"] > 0
  # MFU against the nominal CPU peak: a number, but no goal applies to a CPU.
  assert line["mfu"] is None or 0 < line["mfu"] < 1.5
  assert line["goal"] == 0.5 and line["met"] is None


def test_decode_has_no_roofline_on_cpu(tiny_run):
  line = tiny_run["decode"]
  assert line["tokens_per_s"] > 0 and line["call_tokens_per_s"] > 0
  assert line["weight_bytes"] > 0 and 0 < line["kv_bytes_avg"] < line["kv_bytes_read_by_sampler"]
  assert line["memory_bandwidth"] is None and line["roofline_fraction"] is None
  assert line["goal"] == 0.6 and line["met"] is None


def test_ppo_iteration_splits_its_time(tiny_run):
  line = tiny_run["ppo_iteration"]
  phases = [line["generation_s"], line["scoring_s"], line["update_s"]]
  assert all(t > 0 for t in phases)
  assert line["iteration_s"] == pytest.approx(sum(phases))
  assert 0 < line["generation_fraction"] < 1
  assert line["mfu"] is None or 0 < line["mfu"] < 1.5


def test_decode_bytes_count_weights_once_and_the_filled_cache():
  cfg = device_check.model_config(device_check.FULL, dtype="bfloat16", param_dtype="bfloat16")
  # llama3.2-1b: 16 layers x (k, v) x 8 kv heads x 64 dims x 2 bytes = 32 KiB a slot.
  params = {"w": types.SimpleNamespace(size=cfg.num_params(), dtype=types.SimpleNamespace())}
  params["w"].dtype.itemsize = 2
  weights, kv = device_check.decode_bytes(cfg, params, batch=4, cache_len=10)
  assert weights == 2 * cfg.num_params()
  assert kv == 4 * 10 * 16 * 2 * 8 * 64 * 2


def test_test_selection_fits_the_devices():
  args, _ = device_check.select_tests(device_check.FULL, 8)
  assert args == ["tests/test_sharding.py", "tests/rl/test_sampler.py"]
  args, _ = device_check.select_tests(device_check.FULL, 1)
  # One device: only the (1, 1, 1) mesh of the sharded update, and no sharded sampler.
  assert [a for a in args if "test_sharding" in a] == [
    "tests/test_sharding.py::test_sharded_update_matches_single_device[fsdp_tp-mesh_shape0]"
  ]
  assert "--deselect" in args


def test_halving_on_oom_retries_only_out_of_memory():
  tried = []

  def run(batch):
    tried.append(batch)
    if batch > 2:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    return batch

  assert device_check.halving_on_oom(run, 16, floor=1) == 2 and tried == [16, 8, 4, 2]
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    device_check.halving_on_oom(run, 16, floor=4)

  def broken(batch):
    raise ValueError("a bug, not memory")

  with pytest.raises(ValueError, match="a bug"):
    device_check.halving_on_oom(broken, 16, floor=1)


@pytest.mark.parametrize(
  ("device_kind", "platform", "expected"),
  [
    ("NVIDIA H100 80GB HBM3", "gpu", 3.35e12),
    ("NVIDIA H100 PCIe", "gpu", 2.0e12),
    ("NVIDIA H200", "gpu", 4.8e12),
    ("NVIDIA A100-SXM4-80GB", "gpu", 2.0e12),
    ("TPU v4", "tpu", 1.2e12),
    ("TPU v5 lite", "tpu", 0.82e12),
    ("TPU v5p", "tpu", 2.76e12),
    ("TPU v6 lite", "tpu", 1.64e12),
    ("RTX A1000", "gpu", None),
    ("cpu", "cpu", None),
  ],
)
def test_peak_memory_bandwidth_table(device_kind, platform, expected):
  device = types.SimpleNamespace(device_kind=device_kind, platform=platform)
  bandwidth, note = metrics.peak_memory_bandwidth(device)
  assert bandwidth == expected and note
