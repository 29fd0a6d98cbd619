"""Checkpoints for trainers: a thin wrapper over Orbax's CheckpointManager.

A checkpoint is one Orbax step directory, `<workdir>/checkpoints/<step>/`, holding two items:

  state: a pytree of jax arrays (params, optimizer state, step, RNG keys, KL-controller
         state, ...), possibly sharded across a mesh; saved with `StandardSave`.
  meta:  a small JSON-able dict (data-loader position, config hash, ...); saved with `JsonSave`.

Typical trainer use:

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=config.ckpt_every)
  ckpt.install_sigterm_handler()
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(target=abstract_state)  # lands in abstract_state's shardings
  for step in range(first_step, total_steps + 1):
    state = update(state, batch)
    ckpt.save(step, state, {"loader": loader.get_state()})  # only every save_interval_steps
    if ckpt.preemption_requested(step):
      ckpt.save(step, state, {"loader": loader.get_state()}, force=True)
      break
  ckpt.close()  # waits for the async save to commit, restores the old SIGTERM handler

Orbax does the hard parts: async saves, keep-last-N, only process 0 writing shared files, and
atomic commits (a step is written under `<step>.orbax-checkpoint-tmp-<time>` and renamed when
complete, so an interrupted save never looks like a checkpoint). This file adds what trainers
need on top: typed PRNG keys, a readable error on a shape or structure mismatch, and a SIGTERM
flag for preemption.
"""

import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

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
  when the state is sharded across hosts.

  Args:
    directory: root of the step directories; created if missing. Local or any path Orbax reads
      (gs://...).
    max_to_keep: how many of the most recent checkpoints survive (None: all); older ones are
      deleted.
    save_interval_steps: `save(step, ...)` writes only when `step % save_interval_steps == 0`
      (or at a multi-host preemption sync point), unless `force=True`.
    async_save: write in a background thread; `save` returns once arrays are copied off the
      device, so the caller may donate or overwrite the state right away.
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
      enable_async_checkpointing=async_save,
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
    """The newest step, or None when there is none.

    Counts a save of this process still in flight (restore waits for it), never the leftover of
    a save that was interrupted.
    """
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Saved steps, oldest first (as `latest_step`)."""
    return sorted(self._manager.all_steps())

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
    return self._manager.save(step, args=args, force=force)

  def wait(self) -> None:
    """Blocks until every started save is committed (renamed from its tmp directory)."""
    self._manager.wait_until_finished()

  # -- Restore --------------------------------------------------------------------------------

  def restore(self, step: int | None = None, *, target: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores checkpoint `step` (the latest when None) into the layout of `target`.

    Args:
      step: which step; None for the latest committed one.
      target: the abstract state: a pytree of `jax.ShapeDtypeStruct` with `.sharding` set
        (`jax.eval_shape` of the init function plus shardings), or of concrete arrays whose
        shape, dtype and sharding are used. Arrays are read straight into those shardings,
        whatever mesh the checkpoint was saved from. Leaves without a sharding come back
        replicated. Saved dtypes are cast to the target's.

    Returns:
      (state, meta): state with the structure of `target` (typed PRNG keys come back as typed
      keys of the target's implementation); meta the dict given to `save`.

    Raises:
      FileNotFoundError: nothing is saved in the directory (call `latest_step()` first to
        decide between a fresh start and a resume), or `step` is not a committed checkpoint.
      ValueError: the checkpoint does not fit `target` (another model size, a missing or extra
        parameter); the message names the step directory and the offending parameter paths
        with saved and expected shapes.
    """
    # The step may still be in flight from an async save of this process: let it commit first.
    self.wait()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No committed checkpoint in {self.directory}.")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(
        f"No committed checkpoint for step {step} in {self.directory}; "
        f"committed steps: {self.all_steps()}."
      )

    abstract = jax.tree.map(_abstract_leaf, target)
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
      raise ValueError(
        f"Checkpoint {self._step_dir(step)} does not match the restore target: "
        f"{problems[0]}{more}. Differences:\n  " + "\n  ".join(listed)
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
