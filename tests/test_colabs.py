"""The notebooks run headlessly: their code cells execute in order, on the smoke sizes.

Their first cell installs the package on a Colab runtime only; it is also run here with Colab
faked, subprocess stubbed (no clone, no pip), to check the pip command for each accelerator.
"""

import json
import os
import subprocess
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _code_cells(path):
  with open(path) as f:
    notebook = json.load(f)
  return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]


NOTEBOOKS = ["quickstart.ipynb", "ppo_quickstart.ipynb"]


def _run_install_cell(name, monkeypatch, *, colab, env=(), nvidia_smi=False):
  """Runs the notebook's first cell with subprocess, os.chdir and the TPU device files faked.

  Returns (namespace, the commands check_call was given, the folders chdir was given).
  """
  for var in ("COLAB_RELEASE_TAG", "COLAB_TPU_ADDR", "TPU_NAME"):
    monkeypatch.delenv(var, raising=False)
  for var, value in env:
    monkeypatch.setenv(var, value)
  if colab:
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
  else:
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
  calls, chdirs = [], []

  def fake_run(cmd, **kwargs):
    if cmd[0] != "nvidia-smi":
      raise AssertionError(f"unexpected subprocess.run({cmd})")
    if not nvidia_smi:
      raise FileNotFoundError("nvidia-smi")
    return subprocess.CompletedProcess(cmd, 0)

  monkeypatch.setattr(subprocess, "run", fake_run)
  monkeypatch.setattr(subprocess, "check_call", lambda cmd, **kwargs: calls.append(cmd))
  monkeypatch.setattr(os, "chdir", chdirs.append)
  monkeypatch.setattr("glob.glob", lambda pattern, **kwargs: [])  # no /dev/accel*, /dev/vfio
  monkeypatch.setattr(sys, "path", list(sys.path))
  source = _code_cells(os.path.join(REPO, "colabs", name))[0]
  assert "import jax" not in source  # jax must come after the install (the right backend)
  namespace = {}
  exec(compile(source, f"{name} cell 0", "exec"), namespace)
  return namespace, calls, chdirs


@pytest.mark.parametrize("name", NOTEBOOKS)
@pytest.mark.parametrize(
  "env, nvidia_smi, accelerator, extra",
  [
    ((("COLAB_TPU_ADDR", "10.0.0.2:8470"),), False, "tpu", "[tpu]"),
    ((("TPU_NAME", "local"),), True, "tpu", "[tpu]"),  # a TPU wins over nvidia-smi
    ((), True, "gpu", "[cuda12]"),
    ((), False, "cpu", ""),
  ],
)
def test_install_cell_on_colab(name, env, nvidia_smi, accelerator, extra, monkeypatch):
  namespace, calls, chdirs = _run_install_cell(
    name, monkeypatch, colab=True, env=env, nvidia_smi=nvidia_smi
  )
  clone = namespace["CLONE_DIR"]
  assert (namespace["ON_COLAB"], namespace["ACCELERATOR"]) == (True, accelerator)
  assert calls == [
    ["git", "clone", "--depth=1", namespace["REPO_URL"], clone],
    [sys.executable, "-m", "pip", "install", "-q", "-e", clone + extra],
  ]
  assert chdirs == [clone] and sys.path[0] == clone


def test_install_cell_on_colab_release_tag_only(monkeypatch):
  """COLAB_RELEASE_TAG alone (google.colab not imported yet) also counts as Colab."""
  namespace, calls, _ = _run_install_cell(
    "quickstart.ipynb", monkeypatch, colab=False, env=(("COLAB_RELEASE_TAG", "release"),)
  )
  assert namespace["ON_COLAB"] and calls[-1][-1] == namespace["CLONE_DIR"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_outside_colab_only_prints(name, monkeypatch, capsys):
  namespace, calls, chdirs = _run_install_cell(name, monkeypatch, colab=False, nvidia_smi=True)
  assert (namespace["ON_COLAB"], namespace["ACCELERATOR"]) == (False, "gpu")
  assert calls == [] and chdirs == []
  assert capsys.readouterr().out == "Colab: False; accelerator: gpu\n"


def test_notebooks_share_their_setup_cells():
  """The install cell and the device-fitting helper are the same code in both notebooks."""
  (q_install, q_setup, *_), (p_install, p_setup, *_) = (
    _code_cells(os.path.join(REPO, "colabs", name)) for name in NOTEBOOKS
  )
  assert q_install == p_install
  helper = lambda setup: setup[setup.index("# The batch sizes") :]
  assert helper(q_setup) == helper(p_setup)


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("RLHF_JAX_COLAB_WORKDIR", str(tmp_path))
  monkeypatch.setenv("RLHF_JAX_COLAB_SMOKE", "1")
  cells = _code_cells(os.path.join(REPO, "colabs", "quickstart.ipynb"))
  assert cells
  namespace = {}
  for i, source in enumerate(cells):
    exec(compile(source, f"quickstart.ipynb cell {i}", "exec"), namespace)
  assert "eval/accuracy" in namespace["final"]
  assert namespace["evals"][-1]["step"] == 10


@pytest.mark.slow
def test_ppo_quickstart_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("RLHF_JAX_COLAB_WORKDIR", str(tmp_path))
  monkeypatch.setenv("RLHF_JAX_COLAB_SMOKE", "1")
  cells = _code_cells(os.path.join(REPO, "colabs", "ppo_quickstart.ipynb"))
  namespace = {}
  for i, source in enumerate(cells):
    exec(compile(source, f"ppo_quickstart.ipynb cell {i}", "exec"), namespace)
  assert [r["step"] for r in namespace["evals"]] == [0, 2, 4]
  assert set(namespace["summary"]) >= {"sft_gold_reward", "gold_reward", "kl_to_ref"}
  assert len(namespace["after"]) == 16
  assert os.path.getsize(tmp_path / "reward_vs_kl.png") > 10_000
