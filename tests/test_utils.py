"""Tests for rlhf_jax.utils: atomic writes with ordinary file permissions."""

import os
import stat

import ml_collections
import pytest

from rlhf_jax import config_utils, utils
from rlhf_jax.data import testbed
from rlhf_jax.data.tokenizer import Tokenizer


@pytest.fixture
def umask_022():
  old = os.umask(0o022)
  yield
  os.umask(old)


def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_get_ordinary_permissions_not_those_of_a_temp_file(tmp_path, umask_022):
  # config.json and tokenizer.model were written with mkstemp's 0600.
  config = ml_collections.ConfigDict({"trainer": "sft", "x": 1})
  config_path = config_utils.write_config_json(config, str(tmp_path))
  tok = Tokenizer.train([testbed.sft_examples(50, 0)[i]["response"] for i in range(50)], 64)
  tok.save(tmp_path / "tokenizer.model")
  utils.write_json_atomic(str(tmp_path / "a.json"), {"a": 1})
  with utils.atomic_open(tmp_path / "b.bin", "wb") as f:
    f.write(b"x")
  for path in (config_path, tmp_path / "tokenizer.model", tmp_path / "a.json", tmp_path / "b.bin"):
    assert _mode(path) == 0o644, path


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
  path = tmp_path / "kept.txt"
  path.write_text("old")
  with pytest.raises(RuntimeError), utils.atomic_open(path) as f:
    f.write("half")
    raise RuntimeError("interrupted")
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["kept.txt"]


def test_exclusive_dir_refuses_a_second_holder_or_waits_for_the_first(tmp_path):
  import threading

  folder = str(tmp_path / "new")
  order = []
  with utils.exclusive_dir(folder, "lock"):
    holder = (tmp_path / "new" / "lock").read_text()
    assert holder.startswith("host ") and f", pid {os.getpid()}, since " in holder
    with pytest.raises(config_utils.ConfigError) as refused:
      with utils.exclusive_dir(folder, "lock"):
        pass
    assert str(refused.value) == (
      f"{folder} is in use by another process ({holder}): wait for it to finish or use "
      "another workdir."
    )

    def waiter():
      with utils.exclusive_dir(folder, "lock", wait=True):
        order.append("waiter")

    thread = threading.Thread(target=waiter)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and order == []  # blocked on the holder
    order.append("holder done")
  thread.join(10)
  assert order == ["holder done", "waiter"]
