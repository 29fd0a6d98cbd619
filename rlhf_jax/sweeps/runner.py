"""Plans and runs a sweep: every cell of a grid, with the upstream stages they share trained once.

A sweep's workdir:

    <workdir>/sweep.json                the plan: config, sweep file, overrides, cells, stages
    <workdir>/stages/<section>-<hash>/  an upstream stage (SFT, reward model, ...), one per
                                        distinct config of that section: cells whose `sft`
                                        (and `reward`) sections are equal share one; with
                                        a stage store (`stages_dir`, --stages_dir) the
                                        stages live there instead, shared by every sweep
                                        that uses the store
    <workdir>/cells/<name>/             one cell, a normal run folder; <name> is its overrides,
                                        e.g. "kl.init_coef=0.01+seed=1"
    <dir>/sweep_job.json                what a stage or cell runs (read by rlhf_jax.sweeps.job)
    <dir>/sweep_job.log                 its output, appended on every attempt
    <dir>/sweep_done.json               written when a cell finished
    <workdir>/sweep_report.{md,json}, *.png   the statistics (rlhf_jax.sweeps.report)

Reuse and resume: a finished stage (its export) or cell (sweep_done.json) is not run again; an
unfinished one resumes from its checkpoints, as a rerun of the launcher does. The name of a
stage folder is a hash of its config, so a changed section trains a new stage; a cell folder
holds one config for good: a cell planned with another config than the one its folder was
started with is refused (ConfigError naming the keys), since its checkpoints belong to the
other one.

Stages run level by level (all SFT stages, then all reward models, ...) and cells after them,
each level as one batch for the executor, which runs its jobs in parallel as it can.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging

from rlhf_jax import config_utils, errors, metrics, utils
from rlhf_jax.sweeps import hyper

PLAN_FILE = "sweep.json"
JOB_FILE = "sweep_job.json"
LOG_FILE = "sweep_job.log"
DONE_FILE = "sweep_done.json"
CELLS_DIR = "cells"
STAGES_DIR = "stages"
_NAME_LIMIT = 120


# ------------------------------------------------------------------------------- sweep files


def load_sweep(spec: str) -> list[dict[str, Any]]:
  """The cells a sweep file's `get_sweep(ARG)` returns, for `spec` = "FILE[:ARG]".

  Raises:
    ConfigError: naming the file when it is missing, has no get_sweep, or returns something
      other than a non-empty list of dicts with string keys.
  """
  path, arg, get_sweep = config_utils.file_function(spec, "get_sweep", kind="Sweep", flag="sweep")
  try:
    cells = get_sweep() if arg is None else get_sweep(arg)
  except ValueError as error:  # hyper's checks, a bad arg
    raise errors.ConfigError(f"{path}: get_sweep({arg!r}): {error}") from None
  if not isinstance(cells, list) or not cells:
    raise errors.ConfigError(f"{path}: get_sweep() must return a non-empty list of cells (dicts).")
  out = []
  for i, cell in enumerate(cells):
    if not isinstance(cell, Mapping) or not all(isinstance(k, str) and k for k in cell):
      raise errors.ConfigError(
        f"{path}: cell {i} of get_sweep() is {cell!r}; expected a dict of config keys to values."
      )
    out.append({k.removeprefix("config."): v for k, v in cell.items()})
  return out


# ------------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Job:
  """A stage or a cell: what `rlhf_jax.sweeps.job` runs in `<root>/<name>`."""

  name: str  # "cells/<cell name>" or "stages/<section>-<hash>"
  spec: str  # the config file, "FILE[:ARG]" with an absolute FILE
  overrides: dict[str, Any]  # every key set on the config (the --set ones, then the cell's)
  section: str = ""  # a stage: the section of the config it trains ("sft"); "" for a cell
  init: dict[str, str] = dataclasses.field(default_factory=dict)  # init field -> job name
  level: int = 0  # stages of level k run before those of k+1; cells after every stage
  fingerprint: str = ""  # hash of the job's config, with init fields holding job names
  setting: dict[str, Any] = dataclasses.field(default_factory=dict)  # a cell's non-seed keys
  seeds: dict[str, Any] = dataclasses.field(default_factory=dict)  # a cell's seed keys
  stages_dir: str = ""  # the stage store (absolute) holding the stages; "" = <root>/stages

  @property
  def is_cell(self) -> bool:
    return not self.section

  def record(self) -> dict[str, Any]:
    return utils.jsonable(dataclasses.asdict(self))


@dataclasses.dataclass
class Plan:
  root: str
  stages: list[Job]
  cells: list[Job]
  stages_dir: str = ""  # a stage store shared across sweeps (absolute); "" = <root>/stages

  def workdir(self, job: Job) -> str:
    return os.path.join(self.root, job.name) if job.is_cell else self.stage_path(job.name)

  def stage_path(self, name: str) -> str:
    """The folder of the stage job `name` ("stages/<section>-<hash>")."""
    return stage_path(self.root, name, self.stages_dir)


def stage_path(root: str, name: str, stages_dir: str = "") -> str:
  """Where the stage job `name` lives: in the store `stages_dir`, else under `root`."""
  if stages_dir:
    return os.path.join(stages_dir, name.removeprefix(f"{STAGES_DIR}/"))
  return os.path.join(root, name)


def _format(value: Any) -> str:
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, list | tuple):
    return "-".join(_format(v) for v in value)
  if isinstance(value, str) and (value.endswith(".py") or ".py:" in value):
    path, arg = config_utils.split_config_spec(value)
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem + (f"_{arg}" if arg else "")
  return str(value)


def cell_name(cell: Mapping[str, Any]) -> str:
  """A folder name for a cell: its overrides, "key=value" joined by "+" ("base" if none).

  No commas: a folder name must survive the comma-separated list flags (`--runs=A,B`).
  """
  text = "+".join(f"{k}={_format(v)}" for k, v in cell.items()) or "base"
  text = re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)
  if len(text) > _NAME_LIMIT:
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    text = f"{text[: _NAME_LIMIT - 9]}~{digest}"
  return text


def varying_keys(cells: Sequence[Mapping[str, Any]]) -> list[str]:
  """The keys that tell cells apart, in first-appearance order: they name the cells and make
  their settings. The others are constants of the sweep, set on its cells and named by none.

  Seed keys always count. `config` counts when cells name several config files. Any other key
  counts when it differs between cells of one config file (a key some of them lack counts as
  differing), so the fixed keys of one method in a sweep over methods stay out of the names.
  """
  unset = object()

  def count(group: Sequence[Mapping[str, Any]], key: str) -> int:
    return len({json.dumps(utils.jsonable(c.get(key, unset)), default=repr) for c in group})

  groups: dict[str, list[Mapping[str, Any]]] = {}
  for cell in cells:
    groups.setdefault(json.dumps(cell.get("config"), default=repr), []).append(cell)
  keys = list(dict.fromkeys(k for cell in cells for k in cell))
  out = []
  for key in keys:
    if key == "config":
      varies = len(groups) > 1
    else:
      varies = hyper.is_seed_key(key) or any(count(g, key) > 1 for g in groups.values())
    if varies:
      out.append(key)
  return out


def _absolute_spec(spec: str) -> str:
  path, arg = config_utils.split_config_spec(spec)
  return os.path.abspath(path) + (f":{arg}" if arg is not None else "")


def build_config(
  spec: str,
  overrides: Mapping[str, Any],
  section: str = "",
  init: Mapping[str, str] | None = None,
  source: str = "",
) -> ml_collections.ConfigDict:
  """The config a job runs: the file's, with the overrides set, cut to `section` (a stage),
  and its init fields set to `init`'s values (stage folders, or job names for a fingerprint)."""
  config = config_utils.load_config(spec)
  if not isinstance(config, ml_collections.ConfigDict):
    raise errors.ConfigError(f"{spec}: get_config() returned {config!r}, not a ConfigDict.")
  for key, value in overrides.items():
    config_utils.set_key(config, key, value, source=source)
  if section:
    config = ml_collections.ConfigDict(config[section].to_dict())
  for field, value in (init or {}).items():
    config[field] = value
  return config


def _fingerprint(config: ml_collections.ConfigDict) -> str:
  return hashlib.sha256(config_utils.config_to_json(config).encode()).hexdigest()


def plan(
  root: str,
  cells: Sequence[Mapping[str, Any]],
  config_spec: str | None,
  overrides: Mapping[str, Any] | None = None,
  stages_dir: str = "",
) -> Plan:
  """The stages and cells of a sweep, every config built and validated (nothing runs).

  Args:
    root: the sweep's workdir.
    cells: the grid (`load_sweep`), each a dict of config keys; a `config` key names the
      cell's config file instead of `config_spec`.
    config_spec: the config file, "FILE[:ARG]", of cells without a `config` key.
    overrides: keys set on every cell before its own (the command line's --set).
    stages_dir: a stage store: the upstream stages live there, named by their config's hash,
      so sweeps that use one store train each distinct stage once between them.
  Raises:
    ConfigError: a missing config, an unknown key or a wrong value (naming the cell), two
      cells with one name.
  """
  root = os.path.abspath(root)
  stages_dir = os.path.abspath(stages_dir) if stages_dir else ""
  stages: dict[str, Job] = {}
  jobs: list[Job] = []
  varying = varying_keys(cells)
  for original in cells:
    cell = dict(original)
    name = cell_name({k: v for k, v in cell.items() if k in varying})
    spec = cell.pop("config", None) or config_spec
    if not spec:
      raise errors.ConfigError(
        f"Sweep cell {name} names no config: pass --config or set `config` in the sweep."
      )
    spec = _absolute_spec(spec)
    if overrides and not jobs:  # a mistyped --set key is named as such
      build_config(spec, overrides, source="--set")
    merged = {**(overrides or {}), **cell}
    source = f"the sweep cell {cell_name(original)}"
    config = build_config(spec, merged, source=source)
    config_utils.validate(config)
    init: dict[str, str] = {}  # init field -> stage job name
    for level, (section, field) in enumerate(config_utils.upstream_stages(config)):
      handed = {f: n for f, n in init.items() if f in config[section] and not config[section][f]}
      child = build_config(spec, merged, section, handed, source)
      fingerprint = _fingerprint(child)
      stage = f"{STAGES_DIR}/{section}-{fingerprint[:10]}"
      if stage not in stages:
        stages[stage] = Job(
          stage, spec, merged, section, handed, level, fingerprint, stages_dir=stages_dir
        )
      init[field] = stage
    job = Job(
      f"{CELLS_DIR}/{name}",
      spec,
      merged,
      init=init,
      level=len(init),
      setting={k: v for k, v in original.items() if k in varying and not hyper.is_seed_key(k)},
      seeds={k: v for k, v in original.items() if hyper.is_seed_key(k)},
      stages_dir=stages_dir,
    )
    if "config" in job.setting:  # the config file by its name: "ppo", "dpo_runlocal"
      job.setting["config"] = _format(job.setting["config"])
    job.fingerprint = _fingerprint(build_config(spec, merged, init=init, source=source))
    if any(j.name == job.name for j in jobs):
      raise errors.ConfigError(f"The sweep has the cell {name} twice.")
    jobs.append(job)
  return Plan(root, list(stages.values()), jobs, stages_dir)


def write_plan(plan_: Plan, meta: Mapping[str, Any]) -> None:
  """`<root>/sweep.json` and each job's `sweep_job.json`; refuses a folder of another config.

  Raises:
    ConfigError: a job folder that holds a job of another config.
  """
  os.makedirs(plan_.root, exist_ok=True)
  for job in [*plan_.stages, *plan_.cells]:
    path = os.path.join(plan_.workdir(job), JOB_FILE)
    old = _read_json(path)
    if old is not None and old.get("fingerprint") != job.fingerprint:
      changed = _changed_keys(old, job)
      raise errors.ConfigError(
        f"{plan_.workdir(job)} was started with another config than this sweep gives it "
        f"(differing: {changed}).",
        hint="Use another --workdir, or delete that folder to run the cell again.",
      )
    if old is None:
      utils.write_json_atomic(path, job.record())
  utils.write_json_atomic(
    os.path.join(plan_.root, PLAN_FILE),
    {
      **utils.jsonable(dict(meta)),
      "stages": [j.name for j in plan_.stages],
      "cells": [j.name for j in plan_.cells],
    },
  )


def _changed_keys(old: Mapping[str, Any], job: Job) -> str:
  a = {**old.get("overrides", {}), "(config file)": old.get("spec")}
  b = {**utils.jsonable(job.overrides), "(config file)": job.spec}
  keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
  return ", ".join(keys) or "the config files' defaults"


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as error:
    raise errors.ConfigError(
      f"{path} is unreadable ({error})", hint="Delete that file; the sweep writes it again."
    ) from None


def is_done(plan_: Plan, job: Job) -> bool:
  """A stage with a current export, or a cell with sweep_done.json of its config."""
  workdir = plan_.workdir(job)
  if not job.is_cell:
    from rlhf_jax import stages  # needs JAX

    return stages.is_complete(workdir)
  done = _read_json(os.path.join(workdir, DONE_FILE))
  return done is not None and done.get("fingerprint") == job.fingerprint


# ------------------------------------------------------------------------------- running


@dataclasses.dataclass
class Outcome:
  """How a job ended: its process's exit status and, for a failure, the lines that say why."""

  name: str
  returncode: int
  error: str = ""


def run(plan_: Plan, executor) -> dict[str, Outcome]:
  """Runs every unfinished stage, level by level, then every unfinished cell.

  A cell whose stage failed is not started (its outcome names the stage). Returns the
  outcome of every job that ran or could not, by name; finished jobs have none.
  """
  outcomes: dict[str, Outcome] = {}
  failed: set[str] = set()
  levels = sorted({j.level for j in plan_.stages})
  batches = [[j for j in plan_.stages if j.level == level] for level in levels]
  for batch in [*batches, plan_.cells]:
    pending = []
    for job in batch:
      blocked = sorted(set(job.init.values()) & failed)
      if blocked:
        outcomes[job.name] = Outcome(job.name, 1, f"its upstream stage {blocked[0]} failed")
        failed.add(job.name)
      elif not is_done(plan_, job):
        pending.append(job)
    if not pending:
      continue
    logging.info("sweep: running %d job(s): %s", len(pending), ", ".join(j.name for j in pending))
    for outcome in executor.run([plan_.workdir(j) for j in pending]):
      outcomes[outcome.name] = outcome
      if outcome.returncode != 0:
        failed.add(outcome.name)
  return outcomes


# ------------------------------------------------------------------------------- results


def _numbers(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  out = {}
  for key, value in record.items():
    if not key.startswith(prefix) or isinstance(value, bool):
      continue
    if isinstance(value, int | float):
      out[key.removeprefix(prefix)] = float(value)
  return out


def cell_results(workdir: str) -> tuple[dict[str, float], list[dict[str, float]]]:
  """A finished cell's metrics (summary.json's numbers, else its last eval line's) and its
  curve (every eval line, `eval/` dropped from the names)."""
  try:
    lines = metrics.read_metrics(workdir)
  except FileNotFoundError:
    lines = []
  evals = [r for r in lines if any(k.startswith("eval/") for k in r)]
  curve = [{"step": float(r["step"]), **_numbers(r, "eval/")} for r in evals if "step" in r]
  summary = _read_json(os.path.join(workdir, "summary.json"))
  values = _numbers(summary) if isinstance(summary, dict) else (curve[-1] if curve else {})
  values = {k: v for k, v in values.items() if k != "step"}
  timing = _read_json(os.path.join(workdir, config_utils.TIMING_FILENAME))
  if "wall_time_s" not in values and isinstance(timing, dict):
    values["wall_time_s"] = float(timing.get("total_s", 0.0))
  return values, curve


def records(plan_: Plan, outcomes: Mapping[str, Outcome]) -> list[dict[str, Any]]:
  """One record per cell, as `rlhf_jax.sweeps.report` reads them."""
  out = []
  for job in plan_.cells:
    workdir = plan_.workdir(job)
    record = {
      "name": job.name.removeprefix(f"{CELLS_DIR}/"),
      "overrides": {k: v for k, v in job.overrides.items()},
      "setting": dict(job.setting),
      "seeds": dict(job.seeds),
      "workdir": workdir,
      "stages": {field: plan_.stage_path(name) for field, name in job.init.items()},
      "metrics": {},
      "curve": [],
    }
    if is_done(plan_, job):
      record["metrics"], record["curve"] = cell_results(workdir)
      record["status"] = "done"
    else:
      outcome = outcomes.get(job.name)
      record["status"] = "failed"
      record["error"] = outcome.error if outcome else "not finished"
      record["log"] = os.path.join(workdir, LOG_FILE)
    out.append(utils.jsonable(record))
  return out
