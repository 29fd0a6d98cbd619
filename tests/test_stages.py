"""Tests for rlhf_jax.stages: a stage trained past its export is not complete and not loaded."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint, errors, stages


def _params(value):
  return {"dense": {"kernel": jnp.full((2, 3), value, jnp.float32)}}


def _exported_params(workdir):
  with checkpoint.Checkpointer(os.path.join(workdir, stages.EXPORT_DIR)) as ckpt:
    params, meta = ckpt.restore(0, target=_params(0.0))
  return float(params["dense"]["kernel"][0, 0]), meta


def _save_checkpoint(workdir, step):
  with checkpoint.Checkpointer(os.path.join(workdir, stages.CHECKPOINT_DIR)) as ckpt:
    assert ckpt.save(step, {"params": _params(float(step))}, force=True)


def test_export_behind_its_checkpoint_is_stale_until_exported_again(tmp_path):
  workdir = str(tmp_path / "sft")
  stages.export(workdir, _params(5.0), {"kind": "policy", "step": 5})
  _save_checkpoint(workdir, 5)
  assert stages.is_complete(workdir)
  assert not stages.needs_export(workdir, 5)
  assert stages.needs_export(workdir, 8)

  # Rerun with total_steps=8, stopped before its export: the export is of step 5.
  _save_checkpoint(workdir, 8)
  assert not stages.is_complete(workdir)
  for load in (stages.load_policy, stages.load_reward_model):
    with pytest.raises(errors.StageError) as error:
      load(workdir, mesh=None)
    message = str(error.value)
    assert workdir in message and "step 5" in message and "step 8" in message
    assert "trained past its export" in message
    assert "rerun that stage" in error.value.hint.lower()

  # The finished rerun replaces the export (Checkpointer.save never overwrites step 0).
  assert stages.needs_export(workdir, 8)
  stages.export(workdir, _params(8.0), {"kind": "policy", "step": 8})
  assert stages.is_complete(workdir) and not stages.needs_export(workdir, 8)
  assert stages.read_meta(workdir)["step"] == 8
  assert _exported_params(workdir) == (8.0, {"kind": "policy", "step": 8})
  assert sorted(os.listdir(os.path.join(workdir, stages.EXPORT_DIR))) == ["0"]


def test_export_replaces_parameters_left_without_export_json(tmp_path):
  # A run killed between removing export.json and writing the new one left the old params.
  workdir = str(tmp_path / "sft")
  stages.export(workdir, _params(1.0), {"kind": "policy", "step": 1})
  os.remove(os.path.join(workdir, stages.EXPORT_META))
  assert not stages.is_complete(workdir) and stages.needs_export(workdir, 1)
  stages.export(workdir, _params(2.0), {"kind": "policy", "step": 2})
  value, _ = _exported_params(workdir)
  np.testing.assert_equal(value, 2.0)


def test_read_meta_errors_name_the_stage(tmp_path):
  workdir = str(tmp_path / "missing")
  with pytest.raises(errors.StageError, match="holds no finished stage") as error:
    stages.read_meta(workdir)
  assert isinstance(error.value, FileNotFoundError)  # what callers caught before
  assert workdir in str(error.value)

  os.makedirs(workdir)
  path = os.path.join(workdir, stages.EXPORT_META)
  with open(path, "w") as f:
    f.write('{"kind": "pol')
  with pytest.raises(errors.StageError, match="unreadable") as error:
    stages.read_meta(workdir)
  assert path in str(error.value)
  assert not stages.is_complete(workdir) and stages.needs_export(workdir, 3)
  with open(path, "w") as f:
    json.dump(["not", "an", "object"], f)
  with pytest.raises(errors.StageError, match="not a JSON object"):
    stages.read_meta(workdir)
