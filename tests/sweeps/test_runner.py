"""The sweep's grid, plan, shared stages, reuse, failures and executors, on a fake trainer."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rlhf_jax import errors
from rlhf_jax.sweeps import executors, hyper, runner

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "tests", "fixtures", "sweep_config.py")


def _calls(path):
  with open(os.path.join(path, "calls.txt")) as f:
    return len(f.readlines())


def test_hyper_grids():
  grid = hyper.product([hyper.sweep("config.a", [1, 2]), hyper.seeds(2)])
  assert grid == [
    {"a": 1, "seed": 0},
    {"a": 1, "seed": 1},
    {"a": 2, "seed": 0},
    {"a": 2, "seed": 1},
  ]
  zipped = hyper.zipit([hyper.seeds([3, 4]), hyper.seeds([3, 4], "sft.seed")])
  assert zipped == [{"seed": 3, "sft.seed": 3}, {"seed": 4, "sft.seed": 4}]
  assert hyper.chain([hyper.fixed("a", 1), hyper.sweep("b", "xy")]) == [
    {"a": 1},
    {"b": "x"},
    {"b": "y"},
  ]
  with pytest.raises(ValueError, match="'a' is set twice"):
    hyper.product([hyper.sweep("a", [1]), hyper.fixed("a", 2)])
  with pytest.raises(ValueError, match="different lengths"):
    hyper.zipit([hyper.seeds(2), hyper.seeds(3)])
  with pytest.raises(ValueError, match="no values"):
    hyper.sweep("a", [])
  assert hyper.is_seed_key("reward.seed") and not hyper.is_seed_key("seeds")


def test_plan_shares_stages_and_names_cells_by_what_varies(tmp_path):
  grid = hyper.product([
    hyper.fixed("fail_seed", -1), hyper.sweep("knob", [0.1, 0.2]), hyper.seeds(2),
  ])  # fmt: skip
  plan = runner.plan(str(tmp_path), grid, CONFIG)
  assert [j.name for j in plan.cells] == [
    "cells/knob=0.1+seed=0", "cells/knob=0.1+seed=1",
    "cells/knob=0.2+seed=0", "cells/knob=0.2+seed=1",
  ]  # fmt: skip
  assert len(plan.stages) == 1  # one `sft` section: trained once for the four cells
  stage = plan.stages[0]
  assert stage.name.startswith("stages/sft-") and stage.section == "sft"
  assert all(c.init == {"policy_init": stage.name} for c in plan.cells)
  assert plan.cells[1].setting == {"knob": 0.1} and plan.cells[1].seeds == {"seed": 1}
  assert plan.cells[0].overrides["fail_seed"] == -1  # a constant: set, but in no name
  # Varying the upstream section gives one stage per distinct section.
  grid = hyper.product([hyper.sweep("sft.base", [1.0, 2.0]), hyper.seeds(2)])
  plan = runner.plan(str(tmp_path / "b"), grid, CONFIG)
  assert len(plan.stages) == 2
  assert len({c.init["policy_init"] for c in plan.cells}) == 2
  # A cell's own config file (a sweep over methods) is part of its setting.
  grid = [{"config": CONFIG, "knob": 1.0}, {"config": f"{CONFIG}:other", "knob": 1.0}]
  plan = runner.plan(str(tmp_path / "c"), grid, None)
  assert [c.setting for c in plan.cells] == [
    {"config": "sweep_config"},
    {"config": "sweep_config_other"},
  ]
  assert plan.cells[1].name == "cells/config=sweep_config_other"


def test_plan_refuses_bad_cells(tmp_path):
  with pytest.raises(errors.ConfigError, match=r"config\.knobb.*sweep cell knobb=1.*config\.knob"):
    runner.plan(str(tmp_path), [{"knobb": 1.0}], CONFIG)
  with pytest.raises(errors.ConfigError, match=r"config\.kind"):
    runner.plan(str(tmp_path), [{"kind": "nope"}], CONFIG)
  with pytest.raises(errors.ConfigError, match="names no config"):
    runner.plan(str(tmp_path), [{"knob": 1.0}], None)
  with pytest.raises(errors.ConfigError, match="twice"):
    runner.plan(str(tmp_path), [{"knob": 1.0}, {"knob": 1.0}], CONFIG)


def test_load_sweep_errors(tmp_path):
  path = tmp_path / "s.py"
  path.write_text("def get_sweep(arg=None):\n  return [{'a': 1}, 3]\n")
  with pytest.raises(errors.ConfigError, match="cell 1 of get_sweep"):
    runner.load_sweep(str(path))
  path.write_text("X = 1\n")
  with pytest.raises(errors.ConfigError, match="defines no get_sweep"):
    runner.load_sweep(str(path))
  with pytest.raises(errors.ConfigError, match="not found"):
    runner.load_sweep(str(tmp_path / "missing.py"))
  path.write_text("def get_sweep(arg=None):\n  return [{'config.a': arg}]\n")
  assert runner.load_sweep(f"{path}:x") == [{"a": "x"}]


def _sweep(workdir, *args):
  return subprocess.run(
    [sys.executable, "-m", "experiments.sweep", f"--config={CONFIG}", f"--workdir={workdir}",
     *args],
    cwd=REPO, capture_output=True, text=True, timeout=600,
  )  # fmt: skip


def test_a_sweep_runs_reuses_and_reports(tmp_path):
  sweep_file = tmp_path / "knob.py"
  sweep_file.write_text(
    "from rlhf_jax.sweeps import hyper\n\n\ndef get_sweep(arg=None):\n"
    "  return hyper.product([hyper.sweep('knob', [0.1, 0.3]), hyper.seeds(3)])\n"
  )
  workdir = tmp_path / "sweep"
  result = _sweep(workdir, f"--sweep={sweep_file}", "--parallel=2", "--set=base=0.5")
  assert result.returncode == 0, result.stderr[-3000:]
  stage = next((workdir / "stages").iterdir())
  assert _calls(stage) == 1  # shared by the six cells
  cells = sorted(os.listdir(workdir / "cells"))
  assert len(cells) == 6 and all(_calls(workdir / "cells" / c) == 1 for c in cells)
  with open(workdir / "sweep_report.json") as f:
    report = json.load(f)
  assert report["metric"] == "gold_reward"
  (comparison,) = report["comparisons"]
  assert comparison["paired"] and comparison["resolved"]  # 2.0 apart, the seed effect paired out
  assert comparison["mean"] == pytest.approx(-2.0)
  assert "| `knob=0.1` | 3 |" in result.stdout and "| yes |" in result.stdout
  # A rerun trains nothing: every stage and cell is finished.
  grid = runner.load_sweep(str(sweep_file))
  plan = runner.plan(str(workdir), grid, CONFIG, {"base": 0.5})
  assert runner.run(plan, executors.LocalExecutor()) == {}
  assert _calls(stage) == 1 and all(_calls(workdir / "cells" / c) == 1 for c in cells)
  # Another --set changes every cell's config: its folders are refused, named.
  plan = runner.plan(str(workdir), grid, CONFIG, {"base": 0.7})
  with pytest.raises(errors.ConfigError, match=r"with another config.*differing: base"):
    runner.write_plan(plan, {})


def test_sweeps_share_the_stages_of_a_store(tmp_path):
  """Two sweeps (other knobs, other workdirs) with one --stages_dir train the stage once;
  a job already running in a cell's folder is refused."""
  sweep_file = tmp_path / "knob.py"
  sweep_file.write_text(
    "from rlhf_jax.sweeps import hyper\n\n\ndef get_sweep(arg):\n"
    "  return hyper.product([hyper.sweep('knob', [float(arg)]), hyper.seeds(1)])\n"
  )
  store = tmp_path / "store"
  for knob in ("0.1", "0.2"):
    args = (f"--sweep={sweep_file}:{knob}", f"--stages_dir={store}")
    result = _sweep(tmp_path / f"sweep_{knob}", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / f"sweep_{knob}" / "stages").exists()
  (stage,) = store.iterdir()
  assert stage.name.startswith("sft-") and _calls(stage) == 1
  for knob in ("0.1", "0.2"):
    (cell,) = (tmp_path / f"sweep_{knob}" / "cells").iterdir()
    assert _calls(cell) == 1
    job = json.loads((cell / runner.JOB_FILE).read_text())
    assert job["stages_dir"] == str(store)
  with open(cell / ".sweep_lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    held = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.sweeps.job", str(cell / runner.JOB_FILE)],
      cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
  assert held.returncode == 2, held.stderr[-2000:]
  assert "is in use by another process" in held.stderr and "Traceback" not in held.stderr


def test_failed_cells_are_named_and_the_rest_reported(tmp_path):
  sweep_file = tmp_path / "fail.py"
  sweep_file.write_text(
    "from rlhf_jax.sweeps import hyper\n\n\ndef get_sweep(arg=None):\n"
    "  return hyper.product([hyper.fixed('fail_seed', 1), hyper.seeds(2)])\n"
  )
  workdir = tmp_path / "sweep"
  result = _sweep(workdir, f"--sweep={sweep_file}")
  assert result.returncode == 2  # the cells failed on bad input only
  assert "Cell seed=1 failed: FATAL config error: config.seed = 1" in result.stderr
  assert "sweep_job.log" in result.stderr and "Traceback" not in result.stderr
  with open(workdir / "sweep_report.json") as f:
    report = json.load(f)
  assert [c["status"] for c in report["cells"]] == ["done", "failed"]
  # A bad key on the command line is refused before anything runs.
  bad = _sweep(tmp_path / "bad", f"--sweep={sweep_file}", "--set=knobb=1")
  assert bad.returncode == 2 and "config.knobb" in bad.stderr and "Traceback" not in bad.stderr
  assert not (tmp_path / "bad").exists()


def test_sigterm_stops_the_running_jobs_too(tmp_path):
  sweep_file = tmp_path / "slow.py"
  sweep_file.write_text("def get_sweep(arg=None):\n  return [{'knob': 0.1}, {'knob': 0.2}]\n")
  workdir = tmp_path / "sweep"
  command = [
    sys.executable,
    "-m",
    "experiments.sweep",
    f"--config={CONFIG}",
    f"--workdir={workdir}",
    f"--sweep={sweep_file}",
    "--parallel=2",
    "--set=sleep_s=120",
  ]
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  pids = [workdir / "cells" / name / "pid.txt" for name in ("knob=0.1", "knob=0.2")]
  deadline = time.time() + 120
  while not all(p.exists() and p.read_text() for p in pids):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=60) == 128 + signal.SIGTERM
  for path in pids:  # the jobs went with it
    with pytest.raises(ProcessLookupError):
      os.kill(int(path.read_text()), 0)


def test_dry_run_lists_the_plan(tmp_path):
  sweep_file = tmp_path / "s.py"
  sweep_file.write_text("def get_sweep(arg=None):\n  return [{'knob': 0.1}, {'knob': 0.2}]\n")
  result = _sweep(tmp_path / "w", f"--sweep={sweep_file}", "--dry_run")
  assert result.returncode == 0, result.stderr[-2000:]
  assert (
    "1 upstream stage(s), 2 cell(s)" in result.stdout and "cells/knob=0.2: to run" in result.stdout
  )
  assert not (tmp_path / "w").exists()


def test_the_environment_forwarded_to_remote_jobs():
  env = {"XLA_FLAGS": "--x", "JAX_PLATFORMS": "cpu", "HOME": "/root", "RLHF_JAX_COLAB_SMOKE": "1"}
  assert executors.forwarded_environment(env) == {
    "XLA_FLAGS": "--x", "JAX_PLATFORMS": "cpu", "RLHF_JAX_COLAB_SMOKE": "1",
  }  # fmt: skip


def test_a_two_cell_sweep_on_a_local_ray_instance(tmp_path):
  ray = pytest.importorskip("ray")
  grid = hyper.sweep("knob", [0.1, 0.2])
  plan = runner.plan(str(tmp_path), grid, CONFIG)
  runner.write_plan(plan, {})
  executor = executors.RayExecutor(
    num_cpus=1, init_kwargs={"num_cpus": 2, "object_store_memory": 80 << 20}
  )
  try:
    outcomes = runner.run(plan, executor)
  finally:
    ray.shutdown()
  assert {o.name: o.returncode for o in outcomes.values()} == {
    plan.stages[0].name: 0, "cells/knob=0.1": 0, "cells/knob=0.2": 0,
  }  # fmt: skip
  records = runner.records(plan, outcomes)
  assert [r["metrics"]["gold_reward"] for r in records] == pytest.approx([2.0, 3.0])
  assert _calls(plan.workdir(plan.stages[0])) == 1


@pytest.mark.parametrize(
  "sweep",
  [
    "kl_coef.py", "kl_coef.py:runlocal,upstream", "ppo_steps.py", "overoptimization.py",
    "ppo_gain.py:lever=kl_target", "ppo_gain.py:lever=rm_members", "ppo_gain.py:lever=rm_layers",
    "ppo_gain.py:lever=rm_labels",
  ],
)  # fmt: skip
def test_the_sweep_files_plan(sweep, tmp_path):
  """Every key of every sweep file exists in configs/ppo.py and passes its checks."""
  cells = runner.load_sweep(os.path.join(REPO, "configs", "sweeps", sweep))
  plan = runner.plan(str(tmp_path), cells, os.path.join(REPO, "configs", "ppo.py"))
  assert len(plan.cells) == len(cells) >= 2 and plan.stages
  assert all(len(cell.seeds) >= 1 for cell in plan.cells)
