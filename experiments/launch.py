r"""Launches one run: a config file and its overrides go to the trainer the config names.

  python -m experiments.launch --config=configs/sft.py:runlocal --config.total_steps=20 \
    --workdir=/tmp/sft

  --config=FILE[:ARG]   a Python file whose get_config(ARG) returns a ConfigDict; ARG is one
                        string such as "runlocal,seed=3" (see configs/common.parse_arg).
  --config.KEY=VALUE    overrides a field (dotted for sections). An unknown key or a value of
                        the wrong type is refused with a message naming the key.
  --workdir=DIR         default runs/<file stem>[_<ARG>], e.g. runs/sft_runlocal.
  --[no]jax_distributed call jax.distributed.initialize() first. Unset means auto: on when
                        the environment shows a multi-process job (JAX_COORDINATOR_ADDRESS,
                        SLURM_NTASKS>1, OMPI_COMM_WORLD_SIZE>1, a TPU pod's host list).
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
                        a multi-process job JAX's cluster detection does not see (e.g. two
                        processes on one machine; on CPU they talk through gloo).
  --verbose             also print the traceback of rlhf_jax's own errors.

Compilation cache: compiled programs are kept in JAX's persistent cache, by default
~/.cache/rlhf_jax/jax_compilation (shared by every stage and run of the user), so a stage
that compiles what an earlier one did (the same sampler, the same shapes) loads it instead.
RLHF_JAX_COMPILATION_CACHE=DIR moves it, RLHF_JAX_COMPILATION_CACHE=off switches it off.
At the end, the wall time of each stage (trained or reused) is printed and written to
<workdir>/timing.json.

Errors: bad input (a malformed data file, a config value out of range, a damaged checkpoint,
a missing upstream stage, a NaN in training) is printed as one or two lines, `FATAL <kind>:
<what and where>` and what to do, with exit status 2 and no traceback; a mistyped flag or
config key also exits with 2. Anything else is a bug and shows its traceback. In a
multi-process job, one process's fatal error ends every process within about a second.

Multi-host: run the same command on every host. Process 0 writes config.json and logs at
INFO; the other processes log warnings and errors only (unless --verbosity is given).

The logic lives in rlhf_jax.config_utils (`run(config, workdir)`), so a notebook can do the
same without flags.
"""

from __future__ import annotations

import os
import sys
import traceback

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from rlhf_jax import config_utils, distributed, errors

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, FILE[:ARG].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; default runs/<config name>.")
_JAX_DISTRIBUTED = flags.DEFINE_bool(
  "jax_distributed", None, "Call jax.distributed.initialize(); unset = detect a cluster."
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 (multi-process jobs JAX does not detect)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks of rlhf_jax's own errors too.")
flags.mark_flag_as_required("config")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with messages that name the full key of a bad --config override."""
  try:
    return flags.FLAGS(argv)
  # config_flags lets an unknown key escape as AttributeError/KeyError and a missing file as
  # OSError; flags.Error covers values of the wrong type.
  except (flags.Error, AttributeError, KeyError, OSError) as error:
    try:
      expanded = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    except flags.Error:
      expanded = argv
    message = config_utils.explain_override_error(expanded, error)
    if message is None:
      if not isinstance(error, flags.Error):
        raise  # Not an override mistake: a bug whose traceback is worth seeing.
      message = str(error)
  sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
  sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
  sys.exit(errors.EXIT_CODE)


def report(error: errors.Error, *, verbose: bool, top_workdir: str | None = None) -> None:
  """Prints an rlhf_jax error as the launcher does: `FATAL <kind>: ...` and its hint."""
  if verbose:
    traceback.print_exception(error)
  lines = error.lines()
  stage = getattr(error, "stage", None)
  if stage and top_workdir and os.path.abspath(stage) != os.path.abspath(top_workdir):
    lines[0] += f" (in the upstream stage {stage})"
  sys.stderr.write("\n".join(lines) + "\n")
  sys.stderr.flush()


def _exit(code: int) -> None:
  if jax.process_count() > 1:
    distributed.exit_job(code)  # process 0 lets the others see the failure first
  sys.exit(code)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}", exitcode=errors.EXIT_CODE)
  # Before anything touches devices; jax.process_index() below already does.
  config_utils.maybe_initialize_distributed(
    _JAX_DISTRIBUTED.value,
    coordinator_address=_COORDINATOR.value,
    num_processes=_NUM_PROCESSES.value,
    process_id=_PROCESS_ID.value,
  )
  distributed.start_watchdog()
  if jax.process_index() != 0 and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config_utils.log_environment()
  cache = config_utils.enable_compilation_cache(config_utils.compilation_cache_dir())
  logging.info("Persistent compilation cache: %s", cache or "off")

  spec = flags.FLAGS["config"].config_filename
  workdir = _WORKDIR.value or config_utils.default_workdir(spec)
  logging.info("Config %s, workdir %s", spec, workdir)
  try:
    config = _CONFIG.value
    if not isinstance(config, ml_collections.ConfigDict):
      # config_flags defers a load failure to first use; reloading raises it readably.
      config_utils.load_config(spec)
      raise errors.ConfigError(f"--config={spec} did not give a ConfigDict: {config!r}")
    config_utils.run(config, workdir)
  except errors.Error as error:
    # The message says what to fix; a traceback into the framework would only bury it.
    report(error, verbose=_VERBOSE.value, top_workdir=workdir)
    if isinstance(error, errors.DistributedError):
      distributed.acknowledge()  # another process failed first and told everyone
    else:
      distributed.report_fatal(str(error))
    _exit(errors.EXIT_CODE)
  except BaseException as error:
    if not isinstance(error, SystemExit | KeyboardInterrupt) and jax.process_count() > 1:
      traceback.print_exception(error)
      distributed.report_fatal(f"{type(error).__name__}: {error}")
      _exit(1)
    raise


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
