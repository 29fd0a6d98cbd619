"""Kill a training run mid-way, resume it, and compare with an uninterrupted run.

Shared by the trainers' exact-resume tests: each launches its config as a subprocess (the
way a preempted job really dies). `check_kill_and_sigterm` runs one interrupted chain beside
a straight run: SIGKILL once a checkpoint at or past `kill_after` is committed, a rerun that
is sent SIGTERM (save and exit cleanly) once it has committed a checkpoint past the one it
resumed from, and a rerun to the end; it requires the same final checkpoint (bit for bit),
the same deterministic metrics and the same samples as the straight run. One chain covers
both ways of dying and a resume from each, in four launches rather than five.
`rerun_after_late_stop` adds the stop that lands after the final checkpoint but before the
stage's export.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax import metrics, stages

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch(config, workdir, overrides, cache_dir=None):
  """Starts `experiments.launch` as a subprocess on 2 fake CPU devices.

  With `cache_dir`, the runs share JAX's persistent compilation cache: the
  first fills it, the others load the same executables (bit-exactness is
  unaffected; most of a short run's time is compilation).
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cmd = [sys.executable, "-m", "experiments.launch", f"--config={config}", f"--workdir={workdir}"]
  return subprocess.Popen(
    [*cmd, *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
  )


def committed_steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def run_to_end(config, workdir, overrides, cache_dir=None):
  proc = launch(config, workdir, overrides, cache_dir)
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out.decode()[-3000:]


def signal_when(proc, ready, sig, timeout=900):
  """Sends `sig` to `proc` once `ready()` holds (or lets it end); (returncode, output).

  The output is drained by a thread meanwhile: a child that logs more than a pipe holds
  would otherwise block on its next write and never reach the condition.
  """
  chunks = []
  drain = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
  drain.start()
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if ready():
      proc.send_signal(sig)
      break
    time.sleep(0.02)
  proc.wait(timeout=timeout)
  drain.join(timeout=60)
  return proc.returncode, b"".join(chunks).decode(errors="replace")


def interrupt(config, workdir, overrides, sig, after_step, cache_dir=None):
  """Starts a run and sends `sig` once a checkpoint at or past `after_step` is committed."""
  proc = launch(config, workdir, overrides, cache_dir)
  return signal_when(proc, lambda: any(s >= after_step for s in committed_steps(workdir)), sig)


def final_state(workdir):
  step = max(committed_steps(workdir))
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return step, ocp.StandardCheckpointer().restore(path)


def assert_same_run(reference, resumed, *, total_steps, timing_metrics, samples=True):
  """Same metrics and final checkpoint; with `samples`, the same (non-empty) sample files."""
  deterministic = lambda rows: [
    {k: v for k, v in r.items() if k not in timing_metrics} for r in rows
  ]
  ref_rows = metrics.read_metrics(reference)
  got_rows = metrics.read_metrics(resumed)
  assert [r["step"] for r in got_rows] == [r["step"] for r in ref_rows]
  assert deterministic(got_rows) == deterministic(ref_rows)
  ref_step, ref_state = final_state(reference)
  got_step, got_state = final_state(resumed)
  assert ref_step == got_step == total_steps
  # Bit for bit: params, optimizer state, step, RNG key (and KL controller).
  jax.tree.map(np.testing.assert_array_equal, got_state, ref_state)
  if not samples:  # a trainer that writes none (the reward model): nothing to compare
    assert not any(os.path.exists(os.path.join(d, "samples")) for d in (reference, resumed))
    return
  names = sorted(os.listdir(os.path.join(reference, "samples")))
  assert names and sorted(os.listdir(os.path.join(resumed, "samples"))) == names
  for name in names:
    with open(os.path.join(reference, "samples", name)) as a:
      with open(os.path.join(resumed, "samples", name)) as b:
        assert a.read() == b.read(), name


def check_kill_and_sigterm(
  tmp_path, config, overrides, *, total_steps, kill_after, timing_metrics, samples=True
):
  """The whole exact-resume check: SIGKILL, resume, SIGTERM, resume to the end, vs a straight run.

  The runs' workdirs are `tmp_path` / straight and killed (the whole interrupted chain). The
  SIGTERM must land past the step the rerun resumed from (at least `kill_after`) and before
  `total_steps`: it is sent once the rerun has committed its first checkpoint, and saves commit
  asynchronously, so it lands a step or two past that one. A caller's `kill_after` therefore
  leaves one checkpoint interval and a few steps more before `total_steps`.
  """
  cache = str(tmp_path / "jax_cache")
  reference = str(tmp_path / "straight")
  run_to_end(config, reference, overrides, cache)

  killed = str(tmp_path / "killed")
  rc, out = interrupt(
    config, killed, overrides, signal.SIGKILL, after_step=kill_after, cache_dir=cache
  )
  assert rc == -signal.SIGKILL, out[-2000:]
  resumed = max(committed_steps(killed))
  assert kill_after <= resumed < total_steps, "the kill must land mid-run"

  # The rerun resumes from the killed run's last checkpoint; SIGTERM once it has saved anew.
  rc, out = interrupt(
    config, killed, overrides, signal.SIGTERM, after_step=resumed + 1, cache_dir=cache
  )
  assert rc == 0, out[-2000:]  # SIGTERM: save and exit cleanly
  assert re.search(rf"Resumed from \w+ {resumed}\b", out), out[-2000:]  # step or iteration
  assert "SIGTERM: saved" in out, out[-2000:]
  stopped = max(committed_steps(killed))
  assert resumed < stopped < total_steps, ("the SIGTERM must land mid-run", resumed, stopped)

  run_to_end(config, killed, overrides, cache)
  assert_same_run(
    reference, killed, total_steps=total_steps, timing_metrics=timing_metrics, samples=samples
  )


def rerun_after_late_stop(tmp_path, config, overrides, *, also_remove=()):
  """A run stopped after its final checkpoint, before its export, rerun: its workdir.

  After `check_kill_and_sigterm`: copies its finished `killed` workdir to `tmp_path` /
  late, deletes the export (export.json, export/) and `also_remove` (other paths,
  relative to the workdir, written after the final checkpoint), and reruns it.
  """
  late = str(tmp_path / "late")
  shutil.copytree(str(tmp_path / "killed"), late)
  for name in (stages.EXPORT_META, stages.EXPORT_DIR, *also_remove):
    path = os.path.join(late, name)
    assert os.path.exists(path), name
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  run_to_end(config, late, overrides, str(tmp_path / "jax_cache"))
  return late


def final_eval(workdir):
  """The eval metrics of the last metrics line (the final step's; with the monitor's, which
  the eval line carries too); never empty."""
  last = metrics.read_metrics(workdir)[-1]
  evals = {k: v for k, v in last.items() if k.startswith(("eval/", "monitor/"))}
  assert evals, last
  return evals


def export_params(workdir):
  """(step, params) of the stage's export: one Orbax step, 0."""
  steps = [int(d) for d in os.listdir(os.path.join(workdir, stages.EXPORT_DIR)) if d.isdigit()]
  assert len(steps) == 1, steps
  path = os.path.join(workdir, stages.EXPORT_DIR, str(steps[0]), "state")
  return steps[0], ocp.StandardCheckpointer().restore(path)


def assert_same_export(reference, workdir):
  """The same export.json (final eval included) and exported params, bit for bit."""
  assert stages.read_meta(workdir) == stages.read_meta(reference), workdir
  ref_step, ref_params = export_params(reference)
  step, params = export_params(workdir)
  assert step == ref_step == 0
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)


def read_summary(workdir, timing=("wall_time_s",)):
  """summary.json (the policy optimisers'), less its timing entries."""
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert all(k in summary for k in timing), summary
  return {k: v for k, v in summary.items() if k not in timing}
