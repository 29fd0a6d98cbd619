"""Test setup: 8 fake CPU devices, set before JAX starts, so sharded code is tested on one host."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# The 8 fake devices share one XLA:CPU worker pool of max(PJRT_NPROC, 8) threads. A collective
# blocks its thread until all 8 devices reach it, and a device may run two collectives at once
# when its program has one inside a loop (a scanned layer stack under fsdp) besides another one
# it does not depend on. With 8 threads, all of them can end up waiting in one collective while
# the device still missing from it waits for a free thread: a deadlock, seen in CI as XLA's
# "Termination timeout for `all gather` ... only 7 of them arrived" and an abort (a stack dump
# showed 7 threads in an all-gather and the 8th device in an all-reduce inside a while loop).
# A pool of 4 threads per device leaves room. The rendezvous timeout is raised because 8
# threads on 2 cores can be late under load; a real hang still ends, after 5 minutes.
os.environ.setdefault("PJRT_NPROC", "32")
if "collective_call_terminate_timeout" not in _flags:
  _flags += " --xla_cpu_collective_call_terminate_timeout_seconds=300"
  _flags += " --xla_cpu_collective_call_warn_stuck_timeout_seconds=120"
os.environ["XLA_FLAGS"] = _flags.strip()

# One persistent compilation cache for the whole suite (in-process tests and the launcher
# runs they start inherit it): tests that compile the same programs (the runlocal stages,
# the same tiny models) load them instead. It lives in .pytest_cache, so a second local run
# starts warm; CI's clean clone starts cold. The size cap makes JAX lock the folder, which
# the processes tests start in parallel need.
_cache = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_cache, "jax_compilation"))
# Only programs that took a second or more to compile: the trainers' steps and samplers,
# which many tests and the launcher runs they start compile again. Caching every eager
# op's tiny program too made the eager model tests ~20% slower on a cold cache (each one a
# file written under the lock) and saves nothing in a clean clone.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))


def pytest_collection_modifyitems(config, items):
  """Modules with end-to-end (`slow`) tests run first, each module's tests kept together.

  CI's two xdist workers take tests in this order, so the long runs start early and the
  hundreds of short unit tests fill the gaps at the end, instead of the slowest tests
  (the trainers' resume tests, last in file order) running at the end with one worker idle.
  """
  slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.module.__name__ not in slow)
