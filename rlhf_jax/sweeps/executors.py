"""Where a sweep's jobs run: processes on this machine, or Ray tasks on a cluster.

An executor's `run(dirs)` runs the job in each folder (`python -m rlhf_jax.sweeps.job
<dir>/sweep_job.json`, output appended to `<dir>/sweep_job.log`) and returns one
`runner.Outcome` per job. Every job is a process of its own, so a crash, a leak or JAX's
global state stays inside it.

- `LocalExecutor(parallel=N)`: N processes at a time on this machine (1 by default: on a
  small machine one JAX process already uses every core).
- `RayExecutor(address, num_cpus, num_gpus)`: each job a Ray task with that resource request
  (`pip install 'rlhf_jax[ray]'`). The sweep's workdir must be on a filesystem every node
  sees at the same path, and the package installed on every node. address None starts a
  Ray instance on this machine; "auto" joins the cluster this machine is part of;
  "ray://host:10001" connects a client to a remote one.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from rlhf_jax import errors
from rlhf_jax.sweeps import runner

# The job processes running now, stopped by `terminate_children` when the sweep is.
_CHILDREN: set[subprocess.Popen] = set()
_LOCK = threading.Lock()

# Passed on to jobs that run elsewhere (Ray): how JAX and XLA are set up, and this package's.
_ENV_PREFIXES = ("XLA_", "JAX_", "PJRT_", "RLHF_JAX_", "TF_CPP_")


def forwarded_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """The variables of `environ` (os.environ) that shape a job's JAX: XLA_FLAGS, JAX_*, ..."""
  environ = os.environ if environ is None else environ
  return {k: v for k, v in environ.items() if k.startswith(_ENV_PREFIXES)}


def _error_lines(log_path: str, start: int) -> str:
  """What a failed job said last: its FATAL line(s) when there are, else its last lines."""
  try:
    with open(log_path, encoding="utf-8", errors="replace") as f:
      f.seek(start)
      lines = [line.rstrip() for line in f if line.strip()]
  except OSError:
    return ""
  fatal = [i for i, line in enumerate(lines) if line.startswith("FATAL ")]
  if fatal:
    return " ".join(lines[fatal[-1] : fatal[-1] + 2])
  return " | ".join(lines[-3:])


def run_job_process(
  workdir: str, env: Mapping[str, str] | None = None, cwd: str | None = None
) -> runner.Outcome:
  """Runs the job in `workdir` as a child process; its output goes to the job's log."""
  name = os.path.join(os.path.basename(os.path.dirname(workdir)), os.path.basename(workdir))
  log_path = os.path.join(workdir, runner.LOG_FILE)
  with open(log_path, "a", encoding="utf-8") as log:
    start = log.tell()
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    log.write(f"=== {stamp} sweep job {name}\n")
    log.flush()
    command = [sys.executable, "-m", "rlhf_jax.sweeps.job", os.path.join(workdir, runner.JOB_FILE)]
    environ = {**os.environ, **(env or {})}
    cwd = cwd if cwd and os.path.isdir(cwd) else None
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environ, cwd=cwd)
    with _LOCK:
      _CHILDREN.add(proc)
    try:
      returncode = proc.wait()
    finally:
      with _LOCK:
        _CHILDREN.discard(proc)
  error = "" if returncode == 0 else _error_lines(log_path, start) or f"exit status {returncode}"
  return runner.Outcome(name, returncode, error)


def terminate_children(timeout: float = 60.0) -> None:
  """Stops the jobs this process started: SIGTERM (a trainer saves a checkpoint and exits,
  so the job resumes), then SIGKILL for any still running after `timeout` seconds."""
  with _LOCK:
    children = list(_CHILDREN)
  for proc in children:
    proc.terminate()
  for proc in children:
    try:
      proc.wait(timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def _log_outcome(outcome: runner.Outcome, workdir: str) -> None:
  if outcome.returncode == 0:
    logging.info("sweep: %s finished", outcome.name)
  else:
    logging.warning(
      "sweep: %s failed (exit %d): %s; log %s",
      outcome.name,
      outcome.returncode,
      outcome.error,
      os.path.join(workdir, runner.LOG_FILE),
    )


class LocalExecutor:
  """Jobs as processes on this machine, `parallel` at a time."""

  def __init__(self, parallel: int = 1):
    if parallel < 1:
      raise errors.ConfigError(f"--parallel={parallel} must be >= 1.")
    self.parallel = parallel

  def run(self, workdirs: Sequence[str]) -> list[runner.Outcome]:
    outcomes = []
    with concurrent.futures.ThreadPoolExecutor(self.parallel) as pool:
      futures = {pool.submit(run_job_process, w, None, os.getcwd()): w for w in workdirs}
      try:
        for future in concurrent.futures.as_completed(futures):
          outcome = future.result()
          _log_outcome(outcome, futures[future])
          outcomes.append(outcome)
      except BaseException:  # Ctrl-C, SIGTERM (experiments/sweep.py makes it SystemExit)
        for future in futures:
          future.cancel()
        terminate_children()
        raise
    return outcomes


def _ray_job(workdir: str, env: dict[str, str], cwd: str) -> runner.Outcome:
  # A Ray task: runs on whichever node Ray picks, in a worker process of its own.
  return run_job_process(workdir, env, cwd)


class RayExecutor:
  """Each job a Ray task requesting `num_cpus` CPUs and `num_gpus` GPUs (and `resources`)."""

  def __init__(
    self,
    address: str | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    resources: Mapping[str, float] | None = None,
    init_kwargs: Mapping[str, Any] | None = None,
  ):
    try:
      import ray
    except ImportError:
      raise errors.ConfigError(
        "--executor=ray needs Ray: pip install 'rlhf_jax[ray]' (on every node)."
      ) from None
    self._ray = ray
    self.address = address or None
    self.options = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
    if resources:
      self.options["resources"] = dict(resources)
    self.init_kwargs = dict(init_kwargs or {})

  def _connect(self) -> None:
    ray = self._ray
    if ray.is_initialized():
      return
    kwargs = {"include_dashboard": False, "log_to_driver": False, **self.init_kwargs}
    try:
      ray.init(address=self.address, **kwargs)
    except ConnectionError as error:
      raise errors.ConfigError(
        f"--address={self.address}: no Ray cluster there ({error})."
      ) from None

  def run(self, workdirs: Sequence[str]) -> list[runner.Outcome]:
    self._connect()
    ray = self._ray
    task = ray.remote(_ray_job).options(**self.options)
    env, cwd = forwarded_environment(), os.getcwd()
    pending = {task.remote(w, env, cwd): w for w in workdirs}
    outcomes = []
    while pending:
      done, _ = ray.wait(list(pending), num_returns=1)
      for ref in done:
        workdir = pending.pop(ref)
        try:
          outcome = ray.get(ref)
        except ray.exceptions.RayError as error:  # the task's worker died, a node was lost
          name = os.path.relpath(workdir, os.path.dirname(os.path.dirname(workdir)))
          outcome = runner.Outcome(name, 1, f"Ray: {type(error).__name__}: {error}"[:500])
        _log_outcome(outcome, workdir)
        outcomes.append(outcome)
    return outcomes
