"""Checkpoints for trainers: a thin wrapper over Orbax's CheckpointManager.

A checkpoint is one Orbax step directory, `<workdir>/checkpoints/<step>/`, holding two items:

  state: a pytree of jax arrays (params, optimizer state, step, RNG keys, KL-controller
         state, ...), possibly sharded across a mesh; saved with `StandardSave`.
  meta:  a small JSON-able dict (data-loader position, config hash, ...); saved with `JsonSave`.

Typical trainer use:

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=config.ckpt_every)
  ckpt.install_sigterm_handler()
  if start_step := ckpt.latest_intact_step():  # damaged newer steps are set aside first
    state, meta = ckpt.restore(start_step, target=abstract_state)  # in its shardings
  for step in range(first_step, total_steps + 1):
    state = update(state, batch)
    ckpt.save(step, state, {"loader": loader.get_state()})  # only every save_interval_steps
    if ckpt.preemption_requested(step):
      ckpt.save(step, state, {"loader": loader.get_state()}, force=True)
      break
  ckpt.close()  # waits for the async save to commit, restores the old SIGTERM handler

Orbax does the hard parts: async saves, keep-last-N, only process 0 writing shared files, and
atomic commits (a step is written under `<step>.orbax-checkpoint-tmp` and renamed when
complete, so an interrupted save never looks like a checkpoint). This file adds what trainers
need on top: typed PRNG keys, a readable error on a shape or structure mismatch, a SIGTERM
flag for preemption, and an integrity check.

Integrity: Orbax never checks a committed step's bytes again, so altered bytes may restore as
silently different values, and an emptied item or a garbled metadata file fails with a bare
KeyError or JSONDecodeError naming no folder. Each step therefore carries a checksum manifest
(see `_MANIFEST`). `latest_intact_step()` and `restore()` without a step check the newest step
first; a damaged one is renamed aside to `<step>.damaged-<UTC time>`, with a warning (never
deleted; Orbax no longer lists it, so the step number can be saved again), and the newest intact
older step is used. `restore(step)` of a damaged step raises a CheckpointError instead.
"""

import collections
import hashlib
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from rlhf_jax import distributed, errors

PyTree = Any

_STATE = "state"
_META = "meta"
# A model of another size differs in every parameter; list enough to see the pattern.
_MAX_LISTED = 20


# ---------------------------------------------------------------------------------------------
# Typed PRNG keys
# ---------------------------------------------------------------------------------------------
# New-style keys (`jax.random.key`, dtype key<fry>) are stored as their raw uint32 data; on
# restore the target says which leaves are keys and of which implementation, so the round trip
# gives back the same key type. Old-style uint32 keys are plain arrays and need nothing.


def _is_typed_key(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(leaf: Any) -> Any:
  """The PRNG implementation of a key array or of a key-typed `ShapeDtypeStruct`."""
  # `jax.random.key_impl` rejects a ShapeDtypeStruct but accepts the tracer eval_shape makes.
  impls = []
  jax.eval_shape(lambda key: impls.append(jax.random.key_impl(key)), leaf)
  return impls[0]


def _keys_to_data(state: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, state)


# ---------------------------------------------------------------------------------------------
# Restore targets and their check against the checkpoint
# ---------------------------------------------------------------------------------------------


def _replicated_sharding() -> jax.sharding.Sharding:
  mesh = jax.make_mesh(
    (jax.device_count(),), ("replica",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  return jax.sharding.NamedSharding(mesh, jax.P())


def _abstract_leaf(leaf: Any) -> jax.ShapeDtypeStruct:
  """What Orbax reads for one target leaf: the stored shape and dtype, the target's sharding."""
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    raise TypeError(f"Restore target leaves must be arrays or ShapeDtypeStructs, got {leaf!r}.")
  # A leaf with no sharding (e.g. a numpy array, or eval_shape output not yet given shardings)
  # is restored replicated: correct on any number of hosts, if not the most memory-frugal.
  sharding = getattr(leaf, "sharding", None) or _replicated_sharding()
  if _is_typed_key(leaf):
    # The key's sharding also fits its data: the extra trailing axis is left unsharded.
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _path_str(path: tuple[Any, ...]) -> str:
  """`params/dense/kernel`: jax key paths and Orbax's metadata tree name nodes the same way."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return "/".join(names)


def _shapes_by_path(tree: PyTree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  # Orbax's metadata tree keeps empty nodes (optax.EmptyState, None) as non-array leaves.
  return {_path_str(p): tuple(x.shape) for p, x in leaves if getattr(x, "shape", None) is not None}


def _mismatches(saved: dict, expected: dict) -> list[str]:
  problems = []
  for path, shape in expected.items():
    if path not in saved:
      problems.append(f"'{path}' (expected shape {shape}) is in the target but not the checkpoint")
    elif saved[path] != shape:
      problems.append(f"'{path}' has saved shape {saved[path]} but expected shape {shape}")
  for path, shape in saved.items():
    if path not in expected:
      problems.append(f"'{path}' (saved shape {shape}) is in the checkpoint but not the target")
  return problems


# ---------------------------------------------------------------------------------------------
# Integrity: a checksum manifest in every step directory
# ---------------------------------------------------------------------------------------------
# `<step>/_CHECKSUMS.json` holds the sha256 of every file of the step. Orbax's post-finalization
# hook writes it into the still temporary step directory, after every process has written its
# files and just before the commit rename, so the manifest commits atomically with the step: no
# committed step lacks one (no window for a kill), and nothing is computed later. Orbax ignores
# the file (it reads only its item folders) and deletes it with the step (keep-last-N).
#
# Orbax rewrites two top-level files after the hook, the commit time in _CHECKPOINT_METADATA and
# the marker commit_success.txt, so those are not hashed; _CHECKPOINT_METADATA must be present
# and parse as a JSON object instead.

_MANIFEST = "_CHECKSUMS.json"
_STEP_METADATA = "_CHECKPOINT_METADATA"
_COMMIT_MARKER = "commit_success.txt"
_UNHASHED = frozenset({_MANIFEST, _STEP_METADATA, _COMMIT_MARKER})  # top-level names only
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step directory before its commit
# `<step>.damaged-<UTC time>`: Orbax lists only all-digit names as steps, and its tmp cleanup
# deletes only names with _TMP_SUFFIX (or, on GCS, folders without commit_success.txt, which a
# committed step has).
_ASIDE = ".damaged-"
_STEP_NAME = re.compile(r"^(0|[1-9]\d*)$")  # Orbax's step folder names (no prefix, no padding)
_LISTED_FILES = 3


def committed_steps(directory: str | os.PathLike) -> list[int]:
  """Steps committed in a checkpoint `directory`, oldest first, from the folder names alone.

  For a quick look from outside a run (is a stage's checkpoint past its export?): unlike a
  `Checkpointer`, it creates, deletes and verifies nothing.
  """
  path = epath.Path(directory)
  if not path.is_dir():
    return []
  return sorted(int(p.name) for p in path.iterdir() if _STEP_NAME.match(p.name) and p.is_dir())


def _data_files(step_dir: epath.Path) -> dict[str, epath.Path]:
  """Every file under `step_dir` by relative posix path, less the top-level unhashed ones."""
  files = {}
  pending = [(step_dir, "")]
  while pending:
    folder, prefix = pending.pop()
    for entry in folder.iterdir():
      relative = prefix + entry.name
      if entry.is_dir():
        pending.append((entry, relative + "/"))
      elif prefix or entry.name not in _UNHASHED:
        files[relative] = entry
  return files


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def _write_manifest(step_dir: epath.Path) -> None:
  files = {name: _sha256(path) for name, path in sorted(_data_files(step_dir).items())}
  text = json.dumps({"algorithm": "sha256", "files": files}, indent=1)
  (step_dir / _MANIFEST).write_text(text)


def _listed(names: list[str]) -> str:
  shown = ", ".join(names[:_LISTED_FILES])
  more = len(names) - _LISTED_FILES
  return f"{shown} (and {more} more)" if more > 0 else shown


def _read_json_object(path: epath.Path) -> dict[str, Any] | None:
  """The JSON object in `path`, or None when the file is unreadable or holds something else."""
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError):  # ValueError: JSONDecodeError and UnicodeDecodeError
    return None
  return value if isinstance(value, dict) else None


def _file_problems(step_dir: epath.Path) -> tuple[list[str], bool]:
  """What is wrong with the files of a step directory, and whether it has a manifest.

  Reads and hashes every file, but nothing through Orbax. Without a manifest only
  _CHECKPOINT_METADATA can be checked here.
  """
  problems = []
  has_manifest = (step_dir / _MANIFEST).exists()
  if not (step_dir / _STEP_METADATA).exists():
    if has_manifest:
      problems.append(f"{_STEP_METADATA} is missing")
  elif _read_json_object(step_dir / _STEP_METADATA) is None:
    problems.append(f"{_STEP_METADATA} is garbled (not a JSON object)")
  if not has_manifest:
    return problems, False
  manifest = _read_json_object(step_dir / _MANIFEST)
  expected = (manifest or {}).get("files")
  if not isinstance(expected, dict) or not all(isinstance(v, str) for v in expected.values()):
    return [*problems, f"its checksum manifest {_MANIFEST} is garbled"], True
  actual = _data_files(step_dir)
  missing = sorted(expected.keys() - actual.keys())
  # An item folder emptied or removed as a whole is named once, not file by file.
  for item in sorted({name.split("/")[0] for name in expected if "/" in name}):
    if not any(name.startswith(item + "/") for name in actual):
      state = "empty" if (step_dir / item).is_dir() else "missing"
      problems.append(f"{item}/ is {state}")
      missing = [name for name in missing if not name.startswith(item + "/")]
  altered = [
    n for n in sorted(expected.keys() & actual.keys()) if _sha256(actual[n]) != expected[n]
  ]
  extra = sorted(actual.keys() - expected.keys())
  for what, names in (("checksum mismatch in", altered), ("missing", missing), ("extra", extra)):
    if names:
      problems.append(f"{what} {_listed(names)}")
  return problems, True


def _brief(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


# ---------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------


class PreemptionWatcher:
  """Turns SIGTERM into a flag the train loop polls, so it can save and exit cleanly.

  Cluster schedulers send SIGTERM some seconds before killing a preempted job; Python's default
  is to die at once, losing everything since the last periodic save.

  Multi-host: when several JAX processes run (`jax.distributed.initialize()`), SIGTERM reaches
  hosts at different times but a save is collective, so every host must decide on the same step.
  There `requested(step)` asks `multihost_utils.reached_preemption_sync_point(step)` (JAX's
  coordination service watches SIGTERM and agrees on a step); no Python handler is installed,
  since it would replace the one JAX's preemption service relies on. That path is not covered by
  the single-process tests here: a known limit.
  """

  def __init__(self):
    self._requested = threading.Event()
    self._previous_handler = None
    self._installed = False

  def install(self) -> "PreemptionWatcher":
    """Installs the SIGTERM handler (main thread only); a second call does nothing."""
    if self._installed or jax.process_count() > 1:
      return self
    self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    self._installed = True
    return self

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: will save a checkpoint and stop at the next step.")
    self._requested.set()

  def requested(self, step: int | None = None) -> bool:
    """True once SIGTERM arrived. Call every step; multi-host needs `step`, the same everywhere."""
    if jax.process_count() > 1:
      if step is None:
        raise ValueError("On several processes, preemption_requested() needs the current step.")
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # The preemption service is disabled in jax.config.
        return False
    return self._requested.is_set()

  def close(self) -> None:
    """Puts back the handler that was there before `install`."""
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._installed = False

  def __enter__(self) -> "PreemptionWatcher":
    return self.install()

  def __exit__(self, *exc) -> None:
    self.close()


# ---------------------------------------------------------------------------------------------
# Checkpointer
# ---------------------------------------------------------------------------------------------


class _DropLibraryInfo(logging.Filter):
  """Drops INFO records logged from inside Orbax: a dozen lines per save drown the train log."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


_LOG_FILTER = _DropLibraryInfo()


def quiet_orbax_logs() -> None:
  """Keeps Orbax's warnings and errors, drops its INFO chatter (idempotent)."""
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    if _LOG_FILTER not in handler.filters:
      handler.addFilter(_LOG_FILTER)


class Checkpointer:
  """Saves and restores trainer state in `directory` (`<workdir>/checkpoints`).

  Every process must make the same calls in the same order: saving and restoring are collective
  when the state is sharded across hosts. Process 0 writes the checksum manifests, checks steps
  and sets damaged ones aside; the others follow its verdict.

  Args:
    directory: root of the step directories; created if missing. Local or any path Orbax reads
      (gs://...).
    max_to_keep: how many of the most recent checkpoints survive (None: all); older ones are
      deleted.
    save_interval_steps: `save(step, ...)` writes only when `step % save_interval_steps == 0`
      (or at a multi-host preemption sync point), unless `force=True`.
    async_save: write in a background thread; `save` returns once arrays are copied off the
      device, so the caller may donate or overwrite the state right away. Otherwise `save`
      returns once the step is committed.
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    max_to_keep: int | None = 3,
    save_interval_steps: int = 1000,
    async_save: bool = True,
  ):
    quiet_orbax_logs()
    directory = os.fspath(directory)
    # Tensorstore wants absolute local paths; remote ones (gs://) already are.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self._async_save = async_save
    # Steps handed to Orbax whose commit hook has not run yet, oldest first (process 0 only).
    self._committing: collections.deque[int] = collections.deque()
    self._lock = threading.Lock()
    self._verified: set[int] = set()  # steps whose manifest matched (process 0 only)
    self._unverified_warned: set[int] = set()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
      registry.add(_STATE, args, ocp.handlers.StandardCheckpointHandler)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
      registry.add(_META, args, ocp.handlers.JsonCheckpointHandler)
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
      # Orbax's default policy also saves the very first step offered whatever the interval;
      # trainers expect "every N steps", and use force=True for the final and preemption saves.
      save_decision_policy=policies.AnySavePolicy(
        [
          policies.FixedIntervalPolicy(save_interval_steps),
          policies.PreemptionCheckpointingPolicy(),
        ]
      ),
      # The policy form of `max_to_keep`, which Orbax deprecates as an option.
      preservation_policy=policies.LatestN(n=max_to_keep),
      # Always Orbax's async checkpointer: only it runs the post-finalization hook that writes
      # the manifest. A synchronous save waits for the commit in `save`.
      enable_async_checkpointing=True,
      async_options=ocp.options.AsyncOptions(post_finalization_callback=self._on_finalized),
      # Leftovers of an interrupted save are never read as checkpoints; delete them on start.
      cleanup_tmp_directories=True,
      create=True,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, handler_registry=registry
    )
    self._preemption = PreemptionWatcher()

  # -- Steps ----------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest step, or None when there is none; its files are not checked.

    Counts a save of this process still in flight (restore waits for it), never the leftover of
    a save that was interrupted. To decide where to resume, use `latest_intact_step`.
    """
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Saved steps, oldest first (as `latest_step`)."""
    return sorted(self._manager.all_steps())

  def latest_intact_step(self) -> int | None:
    """The newest step that passes the integrity check, or None when nothing is saved.

    Newer damaged steps are renamed aside with a warning (see `restore`), so the caller resumes
    from the returned step and saves the later step numbers again. No restore target is
    needed: a step with a manifest is checked by its checksums; one without (see `restore`) by
    reading its metadata through Orbax. A later `restore(step, ...)` does not hash it again.

    Raises:
      CheckpointError: steps are saved but none is intact (all are now set aside).
    """
    self.wait()
    if not self._manager.all_steps():
      return None
    problems: list[str] = []
    step = self._newest_intact(problems)
    if step is None:
      raise self._nothing_intact(problems)
    return step

  # -- Save -----------------------------------------------------------------------------------

  def save(
    self, step: int, state: PyTree, meta: Mapping[str, Any] | None = None, *, force: bool = False
  ) -> bool:
    """Saves `state` and `meta` as checkpoint `step`; returns whether it did.

    Without `force`, saves only on multiples of `save_interval_steps` (and at a multi-host
    preemption sync point). `force=True` is for the final and the preemption save. A step that
    is already saved is never overwritten: that call returns False, so a forced save right
    after a periodic one at the same step is harmless.
    """
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(
      **{
        _STATE: ocp.args.StandardSave(_keys_to_data(state)),
        _META: ocp.args.JsonSave(dict(meta or {})),
      }
    )
    primary = jax.process_index() == 0
    if primary:
      with self._lock:
        self._committing.append(step)
    saved = False
    try:
      saved = self._manager.save(step, args=args, force=force)
    except BaseException:
      # Orbax waits for the previous save first; when that failed, its hook never runs.
      with self._lock:
        self._committing.clear()
      raise
    finally:
      if primary and not saved:
        with self._lock:
          if step in self._committing:
            self._committing.remove(step)
    if saved and not self._async_save:
      self.wait()
    return saved

  def wait(self) -> None:
    """Blocks until every started save is committed (renamed from its tmp directory)."""
    try:
      self._manager.wait_until_finished()
    except BaseException:  # a failed save never reaches the hook that would take its step
      with self._lock:
        self._committing.clear()
      raise

  def _on_finalized(self) -> None:
    """Orbax's post-finalization hook (process 0, save thread): writes the step's manifest.

    Runs after every process has written its files and before the commit rename, so the step
    directory still has its temporary name.
    """
    with self._lock:
      step = self._committing.popleft() if self._committing else None
    if step is None:
      return
    root = epath.Path(self.directory)
    step_dir = root / f"{step}{_TMP_SUFFIX}"
    if not step_dir.exists():
      # Other Orbax versions add a timestamp; on GCS the step is written in place.
      candidates = sorted(root.glob(f"{step}{_TMP_SUFFIX}*"))
      step_dir = candidates[-1] if candidates else root / str(step)
    try:
      _write_manifest(step_dir)
    except Exception as error:  # The step is still good: keep it, unverified, and say so.
      logging.warning(
        "Could not write the checksum manifest of checkpoint %s (%s); it will be restored "
        "without its bytes being verified.",
        self._step_dir(step),
        _brief(error),
      )
      try:
        (step_dir / _MANIFEST).unlink(missing_ok=True)  # a partial one would read as damage
      except OSError:
        pass

  # -- Restore --------------------------------------------------------------------------------

  def restore(self, step: int | None = None, *, target: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores checkpoint `step` (the newest intact one when None) into the layout of `target`.

    Before Orbax reads anything, the step's files are checked against its checksum manifest:
    altered bytes, missing or extra files (an emptied `state/`), a garbled manifest or
    _CHECKPOINT_METADATA all make it damaged. A step without a manifest (saved before manifests
    were kept, or whose manifest write failed) cannot be checked byte by byte: it is accepted,
    with a warning, only if Orbax reads it without error, since refusing it would throw away
    good older checkpoints and failing on read is the only damage left to detect.

    With `step=None`, a damaged step (or one without a manifest that Orbax fails to read) is
    renamed to `<step>.damaged-<UTC time>` in the same folder, with a warning naming it and the
    problem, and the next older step is tried. Nothing is deleted, Orbax no longer lists it, and
    the step number can be saved again. An Orbax failure on a step whose checksums matched is
    not damage (the files are exactly as saved) and is raised as is.

    Args:
      step: which step; None for the newest intact one.
      target: the abstract state: a pytree of `jax.ShapeDtypeStruct` with `.sharding` set
        (`jax.eval_shape` of the init function plus shardings), or of concrete arrays whose
        shape, dtype and sharding are used. Arrays are read straight into those shardings,
        whatever mesh the checkpoint was saved from. Leaves without a sharding come back
        replicated. Saved dtypes are cast to the target's.

    Returns:
      (state, meta): state with the structure of `target` (typed PRNG keys come back as typed
      keys of the target's implementation); meta the dict given to `save`.

    Raises:
      FileNotFoundError: nothing is saved in the directory (call `latest_intact_step()` first
        to decide between a fresh start and a resume), or `step` is not a committed checkpoint.
      CheckpointError: the checkpoint does not fit `target` (another model size, a missing or
        extra parameter; the message names the step directory and the offending parameter
        paths with saved and expected shapes); the given `step` is damaged (no fallback when a
        step was asked for); or, with `step=None`, no intact step is left.
    """
    # The step may still be in flight from an async save of this process: let it commit first.
    self.wait()
    abstract = jax.tree.map(_abstract_leaf, target)
    if step is not None:
      if step not in self._manager.all_steps():
        raise FileNotFoundError(
          f"No committed checkpoint for step {step} in {self.directory}; "
          f"committed steps: {self.all_steps()}."
        )
      return self._restore_asked_step(step, abstract, target)
    if not self._manager.all_steps():
      raise FileNotFoundError(f"No committed checkpoint in {self.directory}.")
    problems: list[str] = []
    while (step := self._newest_intact(problems)) is not None:
      try:
        return self._restore_step(step, abstract, target)
      except errors.CheckpointError:  # the target does not fit: no older step would either
        raise
      except Exception as error:
        if self._has_manifest(step):
          raise
        problems.append(self._set_aside_everywhere(step, f"Orbax cannot read it ({_brief(error)})"))
    raise self._nothing_intact(problems)

  def _restore_asked_step(self, step: int, abstract: PyTree, target: PyTree):
    problem = self._agreed_problem(step)
    if problem is None:
      try:
        return self._restore_step(step, abstract, target)
      except errors.CheckpointError:
        raise
      except Exception as error:
        if self._has_manifest(step):
          raise
        problem, cause = f"Orbax cannot read it ({_brief(error)})", error
    else:
      cause = None
    raise errors.CheckpointError(
      f"Checkpoint {self._step_dir(step)} is damaged: {problem}.",
      hint=f"Move that folder out of {self.directory} to resume from an older step (restoring "
      "without naming a step does so itself: it renames damaged steps aside).",
    ) from cause

  def _restore_step(self, step: int, abstract: PyTree, target: PyTree):
    self._check_matches(step, abstract)
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardRestore(abstract), _META: ocp.args.JsonRestore()}
      ),
    )
    # Orbax restores into the target's own containers; only typed keys need rewrapping.
    state = jax.tree.map(
      lambda like, x: (
        jax.random.wrap_key_data(x, impl=_key_impl(like)) if _is_typed_key(like) else x
      ),
      target,
      restored[_STATE],
    )
    return state, dict(restored[_META] or {})

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _check_matches(self, step: int, abstract: PyTree) -> None:
    """Compares shapes with the checkpoint's metadata before reading any array."""
    metadata = self._manager.item_metadata(step)[_STATE]
    saved = _shapes_by_path(getattr(metadata, "tree", metadata))
    problems = _mismatches(saved, _shapes_by_path(abstract))
    if problems:
      more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
      listed = problems[:_MAX_LISTED]
      if len(problems) > _MAX_LISTED:
        listed.append(f"... {len(problems) - _MAX_LISTED} more")
      raise errors.CheckpointError(
        f"Checkpoint {self._step_dir(step)} does not match the restore target: "
        f"{problems[0]}{more}. Differences:\n  " + "\n  ".join(listed),
        hint="Restore with the model and optimizer config the checkpoint was saved with, or "
        "use another workdir.",
      )

  # -- Integrity ------------------------------------------------------------------------------

  def _has_manifest(self, step: int) -> bool:
    return (epath.Path(self._step_dir(step)) / _MANIFEST).exists()

  def _problem(self, step: int) -> str | None:
    """What is wrong with `step`, or None when it is intact (process 0)."""
    if step in self._verified:
      return None
    problems, has_manifest = _file_problems(epath.Path(self._step_dir(step)))
    if problems:
      return "; ".join(problems)
    if has_manifest:
      self._verified.add(step)
      return None
    try:  # No manifest: what Orbax reads first must at least read (no collective calls here).
      if self._manager.item_metadata(step).get(_STATE) is None:
        return "state/ holds no readable array metadata"
      ocp.handlers.JsonCheckpointHandler().restore(epath.Path(self._step_dir(step)) / _META)
    except Exception as error:
      return f"Orbax cannot read it ({_brief(error)})"
    if step not in self._unverified_warned:
      self._unverified_warned.add(step)
      logging.warning(
        "Checkpoint %s has no checksum manifest (%s is missing): its bytes cannot be verified; "
        "accepting it since Orbax reads it.",
        self._step_dir(step),
        _MANIFEST,
      )
    return None

  def _agreed_problem(self, step: int) -> str | None:
    """`_problem(step)` as process 0 sees it, on every process."""
    found: list[str] = []

    def check() -> int:
      problem = self._problem(step)
      if problem is not None:
        found.append(problem)
      return int(problem is not None)

    if self._on_primary(check):
      return found[0] if found else "see the log of process 0"
    return None

  def _newest_intact(self, problems: list[str]) -> int | None:
    """The newest intact step; newer damaged ones are set aside and appended to `problems`."""

    def scan() -> int:
      for step in sorted(self._manager.all_steps(), reverse=True):
        problem = self._problem(step)
        if problem is None:
          return step
        problems.append(self._move_aside(step, problem))
      return -1

    step = self._on_primary(scan)
    if jax.process_count() == 1 and problems:
      self._manager.reload()
    if step < 0:
      if not problems:  # another process: process 0 logged what it found
        problems.append("see the log of process 0")
      return None
    return step

  def _on_primary(self, fn: Callable[[], int]) -> int:
    """fn() on process 0 (which may rename steps), its result on every process."""
    if jax.process_count() == 1:
      return fn()
    value = fn() if jax.process_index() == 0 else 0
    value = int(multihost_utils.broadcast_one_to_all(np.int64(value)))
    self._manager.reload()  # the others see what process 0 renamed
    return value

  def _move_aside(self, step: int, problem: str) -> str:
    """Renames a damaged step to `<step>.damaged-<UTC time>` (process 0); says what it did."""
    source = epath.Path(self._step_dir(step))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = source.parent / f"{step}{_ASIDE}{stamp}"
    count = 1
    while target.exists():
      count += 1
      target = source.parent / f"{step}{_ASIDE}{stamp}-{count}"
    try:
      source.rename(target)
    except OSError as error:
      raise errors.CheckpointError(
        f"Checkpoint {source} is damaged ({problem}) and could not be renamed aside: {error}",
        hint=f"Move that folder out of {self.directory} and run again.",
      ) from error
    self._verified.discard(step)
    logging.warning(
      "Checkpoint %s is damaged (%s): renamed it to %s; trying the older steps.",
      source,
      problem,
      target.name,
    )
    return f"{source}: {problem} (renamed to {target.name})"

  def _set_aside_everywhere(self, step: int, problem: str) -> str:
    """`_move_aside` on process 0, then every process sees the steps without it."""
    said = self._move_aside(step, problem) if jax.process_index() == 0 else problem
    distributed.barrier("checkpoint-set-aside")
    self._manager.reload()
    return said

  def _nothing_intact(self, problems: list[str]) -> errors.CheckpointError:
    return errors.CheckpointError(
      f"No intact checkpoint in {self.directory}: " + "; ".join(problems),
      hint="Nothing was deleted: the damaged steps were renamed to <step>.damaged-<time> in "
      "that folder, so running again starts from scratch; to keep them, move the folder away "
      "first or restore it from a backup.",
    )

  # -- Preemption -----------------------------------------------------------------------------

  def install_sigterm_handler(self) -> None:
    """From now on SIGTERM sets a flag instead of killing the process; see PreemptionWatcher."""
    self._preemption.install()

  def preemption_requested(self, step: int | None = None) -> bool:
    """True once SIGTERM arrived: the loop should `save(step, ..., force=True)` and stop."""
    return self._preemption.requested(step)

  # -- Lifetime -------------------------------------------------------------------------------

  def close(self) -> None:
    """Waits for pending saves, then restores the SIGTERM handler that was there before."""
    try:
      self._manager.close()
    finally:
      self._preemption.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
