"""The flags the sweep commands share (experiments/sweep.py and experiments/compare.py): the
executor's, and the stage store's."""

from __future__ import annotations

from absl import flags

from rlhf_jax.sweeps import executors

_EXECUTOR = flags.DEFINE_enum("executor", "local", ["local", "ray"], "Where the jobs run.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Local executor: jobs (processes) at a time.")
_ADDRESS = flags.DEFINE_string(
  "address", None, "Ray: the cluster's address ('auto', 'ray://host:10001'); unset = start one."
)
_CPUS = flags.DEFINE_float("cpus_per_cell", 1, "Ray: CPUs each job requests.")
_GPUS = flags.DEFINE_float("gpus_per_cell", 0, "Ray: GPUs each job requests.")
_STAGES_DIR = flags.DEFINE_string(
  "stages_dir",
  "",
  "A stage store: upstream stages (SFT, reward model) live there, named by their config's "
  "hash, and are shared by every sweep given the same store; default <workdir>/stages.",
)


def stages_dir() -> str:
  return _STAGES_DIR.value


def make_executor():
  """The executor the flags describe (a ConfigError when Ray is asked for and missing)."""
  if _EXECUTOR.value == "ray":
    return executors.RayExecutor(_ADDRESS.value, num_cpus=_CPUS.value, num_gpus=_GPUS.value)
  return executors.LocalExecutor(_PARALLEL.value)
