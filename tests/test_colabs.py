"""The notebooks run headlessly: their code cells execute in order, on the smoke sizes."""

import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _code_cells(path):
  with open(path) as f:
    notebook = json.load(f)
  return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]


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
