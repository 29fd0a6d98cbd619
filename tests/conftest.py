"""Test setup: 8 fake CPU devices, set before JAX starts, so sharded code is tested on one host."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# The 8 fake devices are 8 threads on 2 cores: a collective waits until all 8 reach it, and
# XLA:CPU aborts the process when one is more than 40 s late (seen under load, with other
# jobs on the cores: "Termination timeout for `all gather` ... only 7 of them arrived").
# Lateness is not a bug here; a real hang still ends, after 15 minutes.
if "collective_call_terminate_timeout" not in _flags:
  _flags += " --xla_cpu_collective_call_terminate_timeout_seconds=900"
  _flags += " --xla_cpu_collective_call_warn_stuck_timeout_seconds=120"
os.environ["XLA_FLAGS"] = _flags.strip()

# One persistent compilation cache for the whole suite (in-process tests and the launcher
# runs they start inherit it): tests that compile the same programs (the runlocal stages,
# the same tiny models) load them instead. It lives in .pytest_cache, so a second local run
# starts warm; CI's clean clone starts cold. The size cap makes JAX lock the folder, which
# the processes tests start in parallel need.
_cache = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_cache, "jax_compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
