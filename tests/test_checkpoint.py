"""Tests for rlhf_jax.checkpoint: exact resume, keep-last-N, sharding, errors, damage, SIGTERM."""

import hashlib
import json
import logging
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import errors
from rlhf_jax.checkpoint import Checkpointer


def _train_state(seed: int = 0, d_model: int = 4):
  """A small but realistic trainer state: params, adam state after one update, step, keys."""
  params = {
    "dense": {
      "kernel": jax.random.normal(jax.random.key(seed), (16, d_model)),
      "bias": jnp.arange(d_model, dtype=jnp.float32),
    },
    "embed": jax.random.normal(jax.random.key(seed + 1), (8, d_model), jnp.bfloat16),
  }
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return {
    "params": params,
    "opt_state": opt_state,
    "step": jnp.int32(7 + seed),
    "rng": jax.random.key(42 + seed),  # new-style typed key, dtype key<fry>
    "legacy_rng": jax.random.PRNGKey(3 + seed),  # old-style uint32[2] key
    "kl_coef": jnp.float32(0.05),
  }


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert got.dtype == want.dtype
    if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
      got, want = jax.random.key_data(got), jax.random.key_data(want)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _committed_dirs(directory):
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def test_round_trip_is_bit_exact_with_meta(tmp_path):
  state = _train_state()
  meta = {"loader": {"epoch": 1, "index": 123}, "config_hash": "abc123"}
  with Checkpointer(tmp_path / "checkpoints", save_interval_steps=1) as ckpt:
    assert ckpt.save(7, state, meta)
  # A fresh Checkpointer, as after a restart, sees the committed step.
  with Checkpointer(tmp_path / "checkpoints") as ckpt:
    assert ckpt.latest_step() == 7
    restored, restored_meta = ckpt.restore(target=_abstract(state))
  _assert_trees_equal(restored, state)
  assert restored["rng"].dtype == state["rng"].dtype  # still a typed key, same implementation
  assert restored["legacy_rng"].dtype == jnp.uint32
  assert restored_meta == meta
  # The restored keys drive the RNG exactly as before.
  np.testing.assert_array_equal(
    jax.random.uniform(restored["rng"], (3,)), jax.random.uniform(state["rng"], (3,))
  )


def test_restore_into_concrete_arrays_and_without_meta(tmp_path):
  state = _train_state()
  with Checkpointer(tmp_path / "checkpoints", save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save(1, state)
    restored, meta = ckpt.restore(1, target=_train_state(seed=5))
  _assert_trees_equal(restored, state)
  assert meta == {}


def test_keeps_last_n(tmp_path):
  directory = tmp_path / "checkpoints"
  with Checkpointer(directory, max_to_keep=2, save_interval_steps=1) as ckpt:
    for step in range(1, 6):
      assert ckpt.save(step, {"x": jnp.full((2,), step)})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
  assert _committed_dirs(directory) == [4, 5]


def test_save_interval_and_force(tmp_path):
  with Checkpointer(tmp_path / "checkpoints", save_interval_steps=5, max_to_keep=10) as ckpt:
    saved = [step for step in range(1, 13) if ckpt.save(step, {"x": jnp.zeros(2)})]
    assert saved == [5, 10]
    assert ckpt.save(12, {"x": jnp.zeros(2)}, force=True)
    # A forced save of a step that is already saved is a harmless no-op.
    assert not ckpt.save(12, {"x": jnp.ones(2)}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [5, 10, 12]
    restored, _ = ckpt.restore(12, target={"x": jnp.ones(2)})
  np.testing.assert_array_equal(restored["x"], np.zeros(2))


def test_async_save_then_wait(tmp_path):
  directory = tmp_path / "checkpoints"
  state = {"w": jnp.arange(64.0).reshape(16, 4)}
  ckpt = Checkpointer(directory, save_interval_steps=1, async_save=True)
  try:
    assert ckpt.save(3, state, {"note": "async"})
    ckpt.wait()
    assert _committed_dirs(directory) == [3]
    assert not [name for name in os.listdir(directory) if "tmp" in name]
    # Restoring a step still being written waits for its commit; dtypes follow the target.
    assert ckpt.save(4, {"w": state["w"] + 1})
    restored, _ = ckpt.restore(4, target={"w": jax.ShapeDtypeStruct((16, 4), jnp.bfloat16)})
    assert restored["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored["w"], (state["w"] + 1).astype(jnp.bfloat16))
  finally:
    ckpt.close()
  with Checkpointer(directory) as reader:
    restored, meta = reader.restore(3, target=state)
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert meta == {"note": "async"}


def test_restore_onto_a_different_mesh(tmp_path):
  # Saved from one device, restored as FSDP shards over 8: the layout comes from the target.
  state = {
    "w": jax.device_put(jnp.arange(64.0).reshape(16, 4), jax.devices()[0]),
    "rngs": jax.random.split(jax.random.key(0), 8),
  }
  with Checkpointer(tmp_path / "checkpoints", save_interval_steps=1) as ckpt:
    ckpt.save(1, state)
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.P("fsdp"))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
  with Checkpointer(tmp_path / "checkpoints") as ckpt:
    restored, _ = ckpt.restore(target=target)
  assert restored["w"].sharding == sharding
  assert {shard.data.shape for shard in restored["w"].addressable_shards} == {(2, 4)}
  assert restored["rngs"].sharding == sharding
  _assert_trees_equal(restored, state)


@pytest.mark.parametrize(
  "change, fragments",
  [
    ("d_model", ["params/dense/kernel", "saved shape (16, 4)", "expected shape (16, 8)"]),
    ("missing", ["params/lora/kernel", "not the checkpoint"]),
    ("extra", ["params/embed", "not the target"]),
  ],
)
def test_mismatched_target_names_path_and_shapes(tmp_path, change, fragments):
  directory = tmp_path / "checkpoints"
  with Checkpointer(directory, save_interval_steps=1) as ckpt:
    ckpt.save(2, _train_state())
  if change == "d_model":
    target = _abstract(_train_state(d_model=8))
  else:
    target = _abstract(_train_state())
    if change == "missing":
      target["params"]["lora"] = {"kernel": jax.ShapeDtypeStruct((4, 2), jnp.float32)}
    else:
      del target["params"]["embed"]
  with Checkpointer(directory) as ckpt, pytest.raises(errors.CheckpointError) as error:
    ckpt.restore(target=target)
  message = str(error.value)
  assert os.path.join(str(directory), "2") in message
  for fragment in fragments:
    assert fragment in message


def test_restore_with_nothing_saved_names_the_directory(tmp_path):
  directory = tmp_path / "checkpoints"
  with Checkpointer(directory) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.all_steps() == []
    with pytest.raises(FileNotFoundError, match=str(directory)):
      ckpt.restore(target={"x": jnp.zeros(2)})
    with pytest.raises(FileNotFoundError, match="step 9"):
      ckpt.restore(9, target={"x": jnp.zeros(2)})


def test_uncommitted_tmp_directory_is_ignored(tmp_path):
  directory = tmp_path / "checkpoints"
  with Checkpointer(directory, save_interval_steps=1) as ckpt:
    ckpt.save(1, {"x": jnp.full((4,), 1.0)})
    ckpt.save(2, {"x": jnp.full((4,), 2.0)})
  # A save of step 3 killed before its commit rename: a copy of a real step, then corrupted.
  leftover = directory / "3.orbax-checkpoint-tmp-1700000000000000"
  shutil.copytree(directory / "2", leftover)
  for root, _, files in os.walk(leftover):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with Checkpointer(directory, save_interval_steps=1) as ckpt:
    assert ckpt.latest_step() == 2
    assert ckpt.all_steps() == [1, 2]
    restored, _ = ckpt.restore(target={"x": jnp.zeros(4)})
    np.testing.assert_array_equal(restored["x"], np.full(4, 2.0))
    # The next save of step 3 is not blocked by the leftover.
    assert ckpt.save(3, {"x": jnp.full((4,), 3.0)})
  assert _committed_dirs(directory) == [1, 2, 3]


def test_sigterm_sets_flag_and_close_restores_previous_handler(tmp_path):
  received = []
  previous = lambda signum, frame: received.append(signum)
  original = signal.signal(signal.SIGTERM, previous)
  try:
    ckpt = Checkpointer(tmp_path / "checkpoints", save_interval_steps=100)
    ckpt.install_sigterm_handler()
    assert signal.getsignal(signal.SIGTERM) is not previous
    assert not ckpt.preemption_requested(5)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    while not ckpt.preemption_requested(5) and time.monotonic() < deadline:
      time.sleep(0.01)  # Python runs signal handlers in the main thread between bytecodes.
    assert ckpt.preemption_requested(5)
    assert received == []  # Our handler took the signal; the process is still alive.
    # What the train loop does next: a forced, off-interval save, then a clean exit.
    assert ckpt.save(5, {"x": jnp.ones(2)}, force=True)
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert ckpt.all_steps() == [5]
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    while not received and time.monotonic() < deadline:
      time.sleep(0.01)
    assert received == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, original)


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints: checksum manifests, fallback to the newest intact step
# ---------------------------------------------------------------------------------------------


def _save_steps(directory, steps, **kwargs):
  with Checkpointer(directory, save_interval_steps=1, max_to_keep=None, **kwargs) as ckpt:
    for step in steps:
      assert ckpt.save(step, {"x": jnp.full((4,), float(step))}, {"step": step})


def _restored_x(ckpt, step=None):
  state, meta = ckpt.restore(step, target={"x": jax.ShapeDtypeStruct((4,), jnp.float32)})
  return float(state["x"][0]), meta


def _set_aside(directory):
  return sorted(name for name in os.listdir(directory) if ".damaged-" in name)


def _alter_meta(step_dir):
  # Still valid JSON, so Orbax alone restores it without complaint.
  (step_dir / "meta" / "metadata").write_text('{"step": 99}')


def _flip_array_bytes(step_dir):
  data = [path for path in (step_dir / "state").rglob("*") if path.parent.name == "d"]
  assert data
  for path in data:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _remove_array_metadata(step_dir):
  (step_dir / "state" / "array_metadatas" / "process_0").unlink()


def _empty_state(step_dir):
  shutil.rmtree(step_dir / "state")
  (step_dir / "state").mkdir()


def _garble(name):
  return lambda step_dir: (step_dir / name).write_text('{"garbled')


@pytest.mark.parametrize(
  "damage, fragment",
  [
    (_alter_meta, "checksum mismatch in meta/metadata"),
    (_flip_array_bytes, "checksum mismatch in state/"),
    (_remove_array_metadata, "missing state/array_metadatas/process_0"),
    (_empty_state, "state/ is empty"),
    (_garble("_CHECKPOINT_METADATA"), "_CHECKPOINT_METADATA is garbled"),
    (_garble("meta/metadata"), "checksum mismatch in meta/metadata"),
    (_garble("state/_METADATA"), "checksum mismatch in state/_METADATA"),
  ],
  ids=[
    "altered-meta",
    "flipped-arrays",
    "missing-file",
    "empty-state",
    "garbled-step-metadata",
    "garbled-meta",
    "garbled-state-metadata",
  ],
)
def test_damaged_latest_step_falls_back_and_is_set_aside(tmp_path, caplog, damage, fragment):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [1, 2])
  damage(directory / "2")
  with Checkpointer(directory, save_interval_steps=1) as ckpt:
    assert _restored_x(ckpt) == (1.0, {"step": 1})
    # The warning names the folder and what is wrong with it.
    warning = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
    assert str(directory / "2") in warning and fragment in warning
    # Renamed aside, not deleted: Orbax no longer lists it, so step 2 can be saved again.
    assert ckpt.all_steps() == [1]
    (aside,) = _set_aside(directory)
    assert aside.startswith("2.damaged-")
    assert ckpt.save(2, {"x": jnp.full((4,), 20.0)}, {"step": 2})
  with Checkpointer(directory) as ckpt:  # the start-up tmp cleanup leaves the damaged step
    assert ckpt.all_steps() == [1, 2]
    assert _restored_x(ckpt) == (20.0, {"step": 2})
  assert _set_aside(directory) == [aside]


def test_latest_intact_step_skips_damage_without_a_target(tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [1, 2, 3])
  _empty_state(directory / "3")
  (directory / "2" / "state" / "stray").write_text("x")  # an extra file is damage too
  with Checkpointer(directory, save_interval_steps=1) as ckpt:
    assert ckpt.latest_intact_step() == 1
    assert ckpt.all_steps() == [1]
    assert _restored_x(ckpt, 1) == (1.0, {"step": 1})
  assert [name.split(".")[0] for name in _set_aside(directory)] == ["2", "3"]
  messages = " ".join(r.getMessage() for r in caplog.records)
  assert "extra state/stray" in messages and "state/ is empty" in messages


def test_every_step_damaged_raises_naming_the_directory(tmp_path):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [1, 2])
  _alter_meta(directory / "1")
  _empty_state(directory / "2")
  with Checkpointer(directory) as ckpt:
    with pytest.raises(errors.CheckpointError) as error:
      ckpt.restore(target={"x": jnp.zeros(4)})
    assert ckpt.latest_intact_step() is None  # both are set aside: a rerun starts afresh
  message = str(error.value)
  assert f"No intact checkpoint in {directory}" in message
  assert "meta/metadata" in message and "state/ is empty" in message
  assert error.value.hint and "Nothing was deleted" in error.value.hint
  assert len(_set_aside(directory)) == 2

  _save_steps(directory, [1])
  _garble("_CHECKPOINT_METADATA")(directory / "1")
  with Checkpointer(directory) as ckpt, pytest.raises(errors.CheckpointError, match=str(directory)):
    ckpt.latest_intact_step()


def test_restoring_a_named_damaged_step_raises_without_fallback(tmp_path):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [1, 2])
  _flip_array_bytes(directory / "2")
  with Checkpointer(directory) as ckpt:
    with pytest.raises(errors.CheckpointError) as error:
      ckpt.restore(2, target={"x": jnp.zeros(4)})
    assert f"Checkpoint {directory / '2'} is damaged: checksum mismatch in state/" in str(
      error.value
    )
    assert ckpt.all_steps() == [1, 2]  # an explicit request sets nothing aside
  assert not _set_aside(directory)


@pytest.mark.parametrize("async_save", [True, False])
def test_manifest_is_written_on_commit_and_deleted_with_its_step(tmp_path, async_save):
  directory = tmp_path / "checkpoints"
  ckpt = Checkpointer(directory, save_interval_steps=1, max_to_keep=2, async_save=async_save)
  try:
    for step in (1, 2, 3):
      assert ckpt.save(step, {"x": jnp.full((4,), float(step))}, {"step": step})
    ckpt.wait()
    # Keep-last-N deleted step 1 with its manifest; nothing else lies in the directory.
    assert sorted(os.listdir(directory)) == ["2", "3"]
    for step in (2, 3):
      with open(directory / str(step) / "_CHECKSUMS.json") as f:
        files = json.load(f)["files"]
      hashed = {
        os.path.relpath(os.path.join(root, name), directory / str(step))
        for root, _, names in os.walk(directory / str(step))
        for name in names
      } - {"_CHECKSUMS.json", "_CHECKPOINT_METADATA", "commit_success.txt"}
      assert set(files) == hashed and "meta/metadata" in files and "state/_METADATA" in files
      digest = hashlib.sha256((directory / str(step) / "meta" / "metadata").read_bytes())
      assert files["meta/metadata"] == digest.hexdigest()
    assert ckpt.latest_intact_step() == 3
  finally:
    ckpt.close()


def test_intact_checkpoint_restores_bit_exactly_without_warnings(tmp_path, caplog):
  state = _train_state()
  directory = tmp_path / "checkpoints"
  with Checkpointer(directory, save_interval_steps=1) as ckpt:
    ckpt.save(7, state, {"loader": 3})
  with Checkpointer(directory) as ckpt:
    assert ckpt.latest_intact_step() == 7
    restored, meta = ckpt.restore(7, target=_abstract(state))
  _assert_trees_equal(restored, state)
  assert meta == {"loader": 3}
  assert not [
    r
    for r in caplog.records
    if r.levelno >= logging.WARNING and "checkpoint" in r.getMessage().lower()
  ]
  assert sorted(os.listdir(directory)) == ["7"]


def test_step_without_manifest_is_accepted_only_if_orbax_reads_it(tmp_path, caplog):
  # As a step saved before manifests were kept: no checksums to compare, so only reading tells.
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [1, 2, 3])
  for step in (1, 2, 3):
    (directory / str(step) / "_CHECKSUMS.json").unlink()
  _empty_state(directory / "3")
  _flip_array_bytes(directory / "2")  # only a full read of the arrays finds this
  with Checkpointer(directory, save_interval_steps=1) as ckpt:
    assert _restored_x(ckpt) == (1.0, {"step": 1})
    assert ckpt.all_steps() == [1]
  messages = " ".join(r.getMessage() for r in caplog.records)
  assert "has no checksum manifest" in messages
  assert "state/ holds no readable array metadata" in messages
  assert "Orbax cannot read it" in messages
  assert [name.split(".")[0] for name in _set_aside(directory)] == ["2", "3"]
