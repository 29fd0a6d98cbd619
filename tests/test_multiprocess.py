"""Two real processes on localhost (jax.distributed, gloo collectives on CPU).

The launcher runs the same command in each process, as on a multi-host job:
process 0 writes the testbed corpus, trains the tokenizer and builds the dataset
while process 1 waits for it (they used to race on the same files and hang), and
any process's fatal error ends the others within seconds (they used to wait five
minutes at JAX's barrier). A 2-process SFT run equals the 1-process 2-device run.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rlhf_jax import sharding, stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("tokens_per_s", "steps_per_s", "mfu", "step_time_s")
SFT = [
  "--config=configs/sft.py:runlocal",
  "--config.total_steps=20",
  "--config.data.num_train=400",
  "--config.data.num_eval=32",
  "--config.eval_every=10",
  "--config.checkpoint_every=10",
  "--config.log_every=5",
  "--config.optim.warmup_steps=2",
  "--config.eval.num_samples=8",
]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
  return env


def _launch(args, workdir, *, process=None, port=None, devices=1):
  cmd = [sys.executable, "-m", "experiments.launch", *args, f"--workdir={workdir}"]
  if process is not None:
    cmd += [
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={process}",
    ]
  return subprocess.Popen(
    cmd, cwd=REPO, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _two_processes(args, workdir, timeout=240):
  """Runs `args` as processes 0 and 1 of one job: [(returncode, output)], and the wall time."""
  port = _free_port()
  start = time.perf_counter()
  procs = [_launch(args, workdir, process=i, port=port) for i in (0, 1)]
  outs = []
  for proc in procs:
    out, _ = proc.communicate(timeout=timeout)
    outs.append((proc.returncode, out))
  return outs, time.perf_counter() - start


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


@pytest.mark.slow
def test_sft_on_two_processes_equals_one_process_with_two_devices(tmp_path):
  two = str(tmp_path / "two")
  (rc0, out0), (rc1, out1) = _two_processes(SFT, two)[0]
  assert rc0 == 0, out0[-3000:]
  assert rc1 == 0, out1[-3000:]
  one = str(tmp_path / "one")
  single = _launch(SFT, one, devices=2)
  out, _ = single.communicate(timeout=240)
  assert single.returncode == 0, out[-3000:]

  assert _metrics(two) == _metrics(one)
  assert sorted(os.listdir(os.path.join(two, "samples"))) == sorted(
    os.listdir(os.path.join(one, "samples"))
  )
  for name in os.listdir(os.path.join(one, "samples")):
    with (
      open(os.path.join(two, "samples", name)) as a,
      open(os.path.join(one, "samples", name)) as b,
    ):
      assert a.read() == b.read(), name
  mesh = sharding.make_mesh((1, -1, 1))
  params = [stages.load_policy(w, mesh).params for w in (two, one)]
  for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Only process 0 wrote the shared files; the tokenizer is the one both used.
  with open(os.path.join(two, "data_info.json")) as f:
    assert json.load(f)["num_train"] == 400


def test_a_data_error_on_process_0_ends_process_1_promptly(tmp_path):
  data = tmp_path / "sft.jsonl"
  data.write_text('{"prompt": "Review of the lamp:", "response": "It glows."}\n{"prompt": 3}\n')
  args = [
    "--config=configs/sft.py:runlocal",
    "--config.data.source=jsonl",
    f"--config.data.train_jsonl={data}",
  ]
  outs, wall = _two_processes(args, str(tmp_path / "run"), timeout=120)
  (rc0, out0), (rc1, out1) = outs
  assert (rc0, rc1) == (2, 2), (out0[-2000:], out1[-2000:])
  assert f"FATAL data error: {data}:2: field 'prompt' must be a non-empty string" in out0
  # Process 1 waited for process 0's build and ends with its message, not a timeout.
  assert f"process 0: {data}:2: field 'prompt' must be a non-empty string" in out1
  assert "Traceback" not in out0 + out1
  assert wall < 60


def test_a_failure_on_one_process_ends_the_other_blocked_in_a_collective(tmp_path):
  args = ["--config=tests/fixtures/collective_config.py"]
  outs, wall = _two_processes(args, str(tmp_path / "run"), timeout=120)
  (rc0, out0), (rc1, out1) = outs
  assert rc1 == 2 and "FATAL data error: data/shard-1.jsonl:7: field 'prompt'" in out1, out1[-2000:]
  # Process 0 sat in an all-reduce waiting for process 1: its watchdog ends it.
  assert rc0 == 2, out0[-2000:]
  assert "FATAL error in another process: process 1: data/shard-1.jsonl:7" in out0
  assert wall < 60
