"""Runs one job of a sweep (a stage or a cell) in its own process: `python -m rlhf_jax.sweeps.job
<dir>/sweep_job.json`. The executors start it; it is also the command to rerun one cell by hand.

The job's config is built as the plan built it (`runner.build_config`), its init fields
pointing at the stage folders of the sweep, and run by `config_utils.run` in the job's folder,
so a killed job resumes from its checkpoints. A finished cell writes `sweep_done.json` (its
config's fingerprint and what the trainer returned). Bad input exits with status 2 and the
launcher's one-line message.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, logging

from rlhf_jax import config_utils, errors, utils
from rlhf_jax.sweeps import runner

SWEEP_LOCK = ".sweep_lock"


def run_job(path: str) -> None:
  """Runs the job that `path` (a sweep_job.json) describes."""
  with open(path, encoding="utf-8") as f:
    job = runner.Job(**json.load(f))
  workdir = os.path.dirname(os.path.abspath(path))
  root = workdir
  for _ in job.name.split("/"):
    root = os.path.dirname(root)
  init = {field: runner.stage_path(root, name, job.stages_dir) for field, name in job.init.items()}
  config = runner.build_config(job.spec, job.overrides, job.section, init, f"the job {job.name}")
  logging.info("sweep job %s: running in %s", job.name, workdir)
  # A stage in a store shared by two sweeps is trained by one of them while the other waits,
  # then finds it finished; a second process on a cell is refused (the run's own lock refuses
  # a second launcher or study in the folder).
  with utils.exclusive_dir(workdir, SWEEP_LOCK, wait=not job.is_cell):
    result = config_utils.run(config, workdir)
  if job.is_cell:
    utils.write_json_atomic(
      os.path.join(workdir, runner.DONE_FILE),
      {"fingerprint": job.fingerprint, "result": utils.jsonable(result)},
    )


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError("Usage: python -m rlhf_jax.sweeps.job <dir>/sweep_job.json")
  config_utils.enable_compilation_cache(config_utils.compilation_cache_dir())
  try:
    run_job(argv[1])
  except errors.Error as error:
    sys.stderr.write("\n".join(error.lines()) + "\n")
    sys.exit(errors.EXIT_CODE)


if __name__ == "__main__":
  app.run(main)
