"""Runs many short command lines of the repository's entry points from one warm interpreter.

Most of a short `python -m experiments.launch ...` that fails on bad input is starting Python
and importing JAX, Flax, Optax, Orbax and the library. `run_many` starts one runner process
(`python -m tests.cli_runner`) that imports those once, then forks a child per command line
(`parallel` at a time). A child is the command line, as far as the entry point can tell:

  - it runs the entry module as `__main__` with `runpy` (as `python -m` does, argv[0] the
    module's file), with the job's arguments in `sys.argv`;
  - its file descriptors 1 and 2 go to files of its own, so everything written to them
    (Python, absl logging, C++ and any thread) is captured, stdout and stderr apart;
  - it ends as the interpreter would: the entry point's SystemExit code, or exit status 1
    and the traceback on stderr for an uncaught exception, after joining non-daemon threads
    and running atexit handlers (the child returns from `main` up to `sys.exit` at the end
    of this file and lets the interpreter shut down). The runner reports each child's exit
    status as `subprocess` does: a child killed by a signal has a negative return code.

Soundness. `fork` copies only the calling thread, so the parent must be single-threaded in
every way that matters before it forks: it only imports modules. Importing JAX does not
create a backend (XLA's thread pools); the first computation or `jax.devices()` does, in a
child (the runner asserts that no backend exists when it forks, so JAX's own warning about
fork never fires). Two native threads do exist, OpenBLAS's (NumPy) and jemalloc's background
thread (pyarrow); both libraries handle fork (pthread_atfork) as they must for
`multiprocessing`. JAX reads its JAX_* variables on import, so the environment is the
runner's, shared by all its children (the caller passes it, e.g. JAX_PLATFORMS=cpu), as is
the working directory, which `python -m` puts first on `sys.path`.

Never import `experiments.*` (or any entry point) in the runner: absl flags are defined
when such a module runs, and runpy runs the entry point again as `__main__`, which would
define them twice. Library modules are imported once and shared, as a fresh process would
import the same files.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import threading
import time

# Imported by the runner before it forks; every entry point imports most of these anyway.
WARM_MODULES = (
  "numpy",
  "jax",
  "jax.numpy",
  "flax.linen",
  "optax",
  "orbax.checkpoint",
  "sentencepiece",
  "pyarrow",
  "pyarrow.parquet",
  "ml_collections",
  "ml_collections.config_flags",
  "absl.app",
  "absl.flags",
  "absl.logging",
  "tensorflow_datasets",
  "rlhf_jax.config_utils",
  "rlhf_jax.distributed",
  "rlhf_jax.errors",
  "rlhf_jax.checkpoint",
  "rlhf_jax.stages",
  "rlhf_jax.data.builders",
  "rlhf_jax.data.preferences",
  "rlhf_jax.data.agreement",
  "rlhf_jax.data.testbed",
  "rlhf_jax.evaluation",
  "rlhf_jax.metrics",
  "rlhf_jax.plots",
  "rlhf_jax.trainers.sft",
  "rlhf_jax.trainers.reward",
  "rlhf_jax.trainers.dpo",
  "rlhf_jax.trainers.ppo",
  "rlhf_jax.trainers.grpo",
  "rlhf_jax.trainers.best_of_n",
)


@dataclasses.dataclass(frozen=True)
class Job:
  entry: str  # the module run as __main__, e.g. "experiments.launch"
  args: tuple[str, ...]  # its command-line arguments (sys.argv[1:])


@dataclasses.dataclass(frozen=True)
class Done:
  returncode: int  # as subprocess's: negative when the child was killed by that signal
  stdout: str
  stderr: str
  seconds: float


def run_many(jobs, *, cwd, env, scratch, parallel=3, timeout=300):
  """Runs `jobs` in one runner process started in `cwd` with `env`: a list of `Done`.

  `scratch` is an empty folder for the job list, the children's output files and the results.
  A job still running after `timeout` seconds is killed (SIGKILL: return code -9).
  """
  os.makedirs(scratch, exist_ok=True)
  with open(os.path.join(scratch, "jobs.json"), "w") as f:
    json.dump([{"entry": job.entry, "args": list(job.args)} for job in jobs], f)
  proc = subprocess.run(
    [sys.executable, "-m", "tests.cli_runner", scratch, str(parallel), str(timeout)],
    cwd=cwd,
    env=env,
    stdin=subprocess.DEVNULL,
    capture_output=True,
    text=True,
    timeout=timeout * len(jobs) + 600,
  )
  assert proc.returncode == 0, f"the runner failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
  with open(os.path.join(scratch, "results.json")) as f:
    results = json.load(f)
  done = []
  for i, result in enumerate(results):
    out, err = (_read(os.path.join(scratch, f"{i}.{name}")) for name in ("out", "err"))
    done.append(Done(result["returncode"], out, err, result["seconds"]))
  return done


def _read(path):
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


# ------------------------------------------------------------------------ the runner process


def _warm_up():
  """Imports WARM_MODULES; fails if that started a JAX backend or a Python thread."""
  for name in WARM_MODULES:
    importlib.import_module(name)
  from jax._src import xla_bridge

  assert not xla_bridge._backends, "a JAX backend exists before fork"
  assert threading.active_count() == 1, threading.enumerate()


def _become(job, scratch, i):
  """In a forked child: fds 1 and 2 to the job's files, then the entry point as __main__."""
  for fd, name in ((1, "out"), (2, "err")):
    file = os.open(os.path.join(scratch, f"{i}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(file, fd)
    os.close(file)
  sys.argv = [job["entry"], *job["args"]]  # run_module puts the module's file in argv[0]
  runpy.run_module(job["entry"], run_name="__main__", alter_sys=True)
  return 0


def main(argv):
  """Forks a child per job, `parallel` at a time; the children return from here (see above)."""
  scratch, parallel, timeout = argv[1], int(argv[2]), float(argv[3])
  with open(os.path.join(scratch, "jobs.json")) as f:
    jobs = json.load(f)
  _warm_up()
  pending = list(enumerate(jobs))
  running = {}  # pid: (index, start time)
  results = [None] * len(jobs)
  while pending or running:
    while pending and len(running) < parallel:
      i, job = pending.pop(0)
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        return _become(job, scratch, i)  # no try/finally around here: nothing else runs
      running[pid] = (i, time.monotonic())
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid == 0:
      for child, (_, start) in running.items():
        if time.monotonic() - start > timeout:
          os.kill(child, signal.SIGKILL)
      time.sleep(0.02)
      continue
    i, start = running.pop(pid)
    code = os.waitstatus_to_exitcode(status)
    results[i] = {"returncode": code, "seconds": round(time.monotonic() - start, 2)}
  with open(os.path.join(scratch, "results.json"), "w") as f:
    json.dump(results, f)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
