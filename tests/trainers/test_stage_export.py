"""A finished stage rerun with a larger total_steps exports again (SFT, the smallest trainer)."""

import os

import jax
import numpy as np

from rlhf_jax import config_utils, stages
from tests.trainers import resume

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# As small as the SFT trainer runs: a few steps, tiny data and evals.
TINY = {
  "log_every": 1,
  "optim.warmup_steps": 1,
  "batch_size": 8,
  "model.num_layers": 1,
  "eval_every": 1000,
  "checkpoint_every": 1000,
  "data.num_train": 200,
  "data.num_eval": 8,
  "eval.num_samples": 2,
  "eval.max_new_tokens": 4,
}


def _sft_config(total_steps):
  config = config_utils.load_config(os.path.join(REPO, "configs/sft.py:runlocal"))
  with config.unlocked():
    config.total_steps = total_steps
    for key, value in TINY.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def test_rerun_with_more_steps_replaces_the_export(tmp_path):
  workdir = str(tmp_path / "sft")
  config_utils.run(_sft_config(2), workdir)
  assert stages.read_meta(workdir)["step"] == 2
  _, before = resume.export_params(workdir)

  config_utils.run(_sft_config(4), workdir)
  assert resume.committed_steps(workdir)[-1] == 4
  assert stages.read_meta(workdir)["step"] == 4
  assert stages.is_complete(workdir)
  _, after = resume.export_params(workdir)
  _, final = resume.final_state(workdir)
  # The export is the final checkpoint's params, no longer step 2's.
  jax.tree.map(np.testing.assert_array_equal, after, final["params"])
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
  assert any(jax.tree.leaves(changed))
