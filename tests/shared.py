"""Expensive fixtures built once per test run, also when pytest-xdist spreads the tests of one
module over several workers (CI runs `pytest -n 2`).

A module- or session-scoped fixture is built once per process; under xdist each worker is a
process, so a trained stage would be trained once per worker. `once` builds it under a file
lock in the folder that all workers of a run share, and the others (and later modules) load
the pickled result. A worker that dies while building releases the lock with its process; the
next caller starts again in an emptied folder.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from typing import TypeVar

import filelock
import pytest

T = TypeVar("T")


def run_root(tmp_path_factory: pytest.TempPathFactory) -> str:
  """The temporary folder this test run's workers share (the worker's own one without xdist)."""
  base = tmp_path_factory.getbasetemp()
  return str(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


def once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[str], T]) -> T:
  """`build(folder)` run once per test run, its result shared (it must pickle).

  `folder` is an empty folder named `name` for the build's files; they stay for the whole run.
  """
  root = os.path.join(run_root(tmp_path_factory), "shared")
  os.makedirs(root, exist_ok=True)
  folder = os.path.join(root, name)
  done = folder + ".pickle"
  with filelock.FileLock(folder + ".lock"):
    if os.path.exists(done):
      with open(done, "rb") as f:
        return pickle.load(f)
    shutil.rmtree(folder, ignore_errors=True)  # what a build that died left
    os.makedirs(folder)
    result = build(folder)
    with open(done + ".tmp", "wb") as f:
      pickle.dump(result, f)
    os.replace(done + ".tmp", done)
    return result
