"""Coordination between the processes of a multi-process JAX job.

JAX's multi-controller runtime (`jax.distributed.initialize()`) runs the same
program on every host; collectives keep the devices in step, but files are
another matter. This module gives the few host-side rules the framework
needs, on top of the coordination service's key-value store:

  primary_first(name, fn)  process 0 runs fn() (e.g. builds a dataset into the
                           shared workdir); the others wait until it has
                           finished and then run fn() themselves (which then
                           only opens what process 0 built). A failure on
                           process 0 ends the wait on the others at once.
  barrier(name)            every process waits until all have reached it.
  report_fatal(message)    publish this process's fatal error; the watchdog of
                           every other process prints it and ends that process
                           with exit status 2 within about a second, wherever
                           it is blocked (a collective, a barrier, a save).
  exit_job(code)           end this process; process 0, which hosts JAX's
                           coordination service, first waits (a few seconds at
                           most) until every other process has reported or
                           acknowledged the failure, since the others abort
                           with an unrelated C++ error once the service is gone.
  start_watchdog()         the launcher starts it once per process.

With one process every call is a plain local call: fn() runs, barriers return.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax

from rlhf_jax import errors

T = TypeVar("T")

_PREFIX = "rlhf_jax"
_POLL_S = 0.2
_counters: dict[str, int] = {}
_counter_lock = threading.Lock()
_watchdog: threading.Thread | None = None


def is_primary() -> bool:
  return jax.process_index() == 0


def _client() -> Any | None:
  """The coordination-service client, or None in a single-process run."""
  if jax.process_count() == 1:
    return None
  from jax._src import distributed as jax_distributed  # no public accessor in JAX 0.10

  return jax_distributed.global_state.client


def _unique(name: str) -> str:
  """`name/<n>`: the n-th use of `name` in this process (every process counts alike)."""
  with _counter_lock:
    count = _counters.get(name, 0)
    _counters[name] = count + 1
  return f"{_PREFIX}/{name}/{count}"


def _fatal_messages(client) -> list[tuple[int, str]]:
  try:
    entries = client.key_value_dir_get(f"{_PREFIX}/fatal/")
  except Exception:
    return []
  out = []
  for key, value in entries:
    try:
      out.append((int(key.rsplit("/", 1)[-1]), value))
    except ValueError:
      continue
  return sorted(out)


def _raise_if_other_failed(client) -> None:
  me = jax.process_index()
  for process, message in _fatal_messages(client):
    if process != me:
      raise errors.DistributedError(f"process {process}: {message}")


def _wait_for(client, key: str, what: str) -> str:
  """Polls `key` until it is set; stops at once when another process reported a failure."""
  while True:
    _raise_if_other_failed(client)
    try:
      return client.blocking_key_value_get(key, int(_POLL_S * 1000))
    except Exception as error:
      if "DEADLINE_EXCEEDED" not in str(error):
        raise errors.DistributedError(
          f"lost the coordination service while {what}: {error}"
        ) from None


def primary_first(name: str, fn: Callable[[], T], others: Callable[[], T] | None = None) -> T:
  """Runs fn() on process 0; the others run `others()` (default fn) once it has returned.

  Args:
    name: what is being done (e.g. "sft-data"); the same on every process.
    fn: the work. On process 0 it writes shared files; on the others it must
      only read them (e.g. a TFDS build that finds the dataset built).
    others: what the other processes run instead of fn (e.g. load the file fn wrote).
  Raises:
    DistributedError: on the others, when process 0 failed instead.
  """
  client = _client()
  if client is None:
    return fn()
  key = _unique(f"primary_first/{name}")
  if is_primary():
    result = fn()
    client.key_value_set(key, "done")
    return result
  _wait_for(client, key, f"waiting for process 0 to finish {name!r}")
  return (others or fn)()


def barrier(name: str) -> None:
  """Waits until every process has called barrier(name) as often as this one."""
  client = _client()
  if client is None:
    return
  key = _unique(f"barrier/{name}")
  client.key_value_set(f"{key}/{jax.process_index()}", "here")
  while True:
    _raise_if_other_failed(client)
    try:
      arrived = len(client.key_value_dir_get(f"{key}/"))
    except Exception as error:
      raise errors.DistributedError(
        f"lost the coordination service at barrier {name!r}: {error}"
      ) from None
    if arrived >= jax.process_count():
      return
    time.sleep(_POLL_S)


def _set(key: str, value: str) -> None:
  client = _client()
  if client is None:
    return
  try:
    client.key_value_set(key, value)
  except Exception:  # already set, or the service is gone: nothing more to tell
    pass


def report_fatal(message: str) -> None:
  """Tells the other processes that this one is ending with `message` (no-op alone)."""
  _set(f"{_PREFIX}/fatal/{jax.process_index()}", message)


def acknowledge() -> None:
  """Tells process 0 that this process saw another's failure and is ending too."""
  _set(f"{_PREFIX}/ended/{jax.process_index()}", "ended")


def exit_job(code: int, timeout_s: float = 5.0) -> None:
  """Ends this process with `code` (os._exit: jax.distributed's exit handler would wait for
  the others at a shutdown barrier). Process 0 first waits up to `timeout_s` until every
  other process has reported a failure or acknowledged one."""
  sys.stdout.flush()
  sys.stderr.flush()
  client = _client()
  if client is not None and is_primary():
    others = set(range(1, jax.process_count()))
    deadline = time.monotonic() + timeout_s
    while others and time.monotonic() < deadline:
      for kind in ("fatal", "ended"):
        try:
          entries = client.key_value_dir_get(f"{_PREFIX}/{kind}/")
        except Exception:  # the service is going down: stop waiting
          entries, others = [], set()
        others -= {int(key.rsplit("/", 1)[-1]) for key, _ in entries}
      time.sleep(_POLL_S)
  os._exit(code)


def start_watchdog(poll_s: float = 0.5) -> None:
  """Ends this process (exit 2) as soon as another process reports a fatal error.

  A daemon thread polls the key-value store; it runs even while the main
  thread waits in a collective, which would otherwise block until JAX's
  heartbeat timeout (minutes). Idempotent; nothing happens in a single process.
  """
  global _watchdog
  client = _client()
  if client is None or _watchdog is not None:
    return
  me = jax.process_index()

  def watch():
    while True:
      time.sleep(poll_s)
      for process, message in _fatal_messages(client):
        if process != me:
          sys.stderr.write(f"FATAL {errors.DistributedError.kind}: process {process}: {message}\n")
          acknowledge()
          exit_job(errors.EXIT_CODE)

  _watchdog = threading.Thread(target=watch, name="rlhf_jax-watchdog", daemon=True)
  _watchdog.start()
