"""SFT trainer: the runlocal smoke test, exact resume after a kill (and after a stop before
the export), NaN stop, bad data."""

import json
import os

import jax
import numpy as np
import optax
import pytest

from rlhf_jax import config_utils, metrics, optim, stages
from rlhf_jax.data import builders, loader
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.trainers import sft
from tests.trainers import resume

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Small enough for CI, long enough that a kill lands mid-run.
RESUME_OVERRIDES = [
  "--config.total_steps=160",
  "--config.data.num_train=600",
  "--config.data.num_eval=32",
  "--config.log_every=10",
  "--config.eval_every=80",
  "--config.checkpoint_every=20",
  "--config.keep_checkpoints=20",
  "--config.eval.num_samples=8",
]


@pytest.mark.slow
def test_resume_after_kill_and_after_sigterm_is_exact(tmp_path):
  config, overrides = "configs/sft.py:runlocal", ["--config.mesh=(1,-1,1)", *RESUME_OVERRIDES]
  resume.check_kill_and_sigterm(
    tmp_path, config, overrides, total_steps=160, kill_after=60, timing_metrics=sft.TIMING_METRICS
  )
  straight = str(tmp_path / "straight")
  assert stages.read_meta(straight)["eval"] == resume.final_eval(straight)
  # Stopped after the final checkpoint but before the export: the rerun recomputes the
  # final eval (same samples file, no new metrics line) and exports the same stage.
  late = resume.rerun_after_late_stop(tmp_path, config, overrides)
  resume.assert_same_run(straight, late, total_steps=160, timing_metrics=sft.TIMING_METRICS)
  for name in ("killed", "late"):
    resume.assert_same_export(straight, str(tmp_path / name))


def _runlocal_config(**overrides):
  config = config_utils.load_config(os.path.join(REPO, "configs/sft.py:runlocal"))
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


@pytest.mark.slow
def test_runlocal_learns_and_writes_the_workdir(tmp_path):
  workdir = str(tmp_path / "sft")
  config = _runlocal_config()
  final = config_utils.run(config, workdir)
  rows = metrics.read_metrics(workdir)
  evals = [r for r in rows if "eval/loss" in r]
  assert evals[0]["step"] == 0 and evals[-1]["step"] == config.total_steps
  # The eval loss falls clearly (from ~5.8 nats at init).
  assert evals[-1]["eval/loss"] < 0.5 * evals[0]["eval/loss"], evals
  assert final["eval/loss"] == evals[-1]["eval/loss"]
  train_rows = [r for r in rows if "loss" in r]
  for key in ("loss", "lr", "grad_norm", "param_norm", "update_norm", "tokens_per_s", "mfu"):
    assert all(key in r for r in train_rows), key
  # Samples at each eval step, with the testbed's gold reward.
  samples = sorted(os.listdir(os.path.join(workdir, "samples")))
  assert samples == [f"step_{s:07d}.jsonl" for s in (0, 60, 120)]
  with open(os.path.join(workdir, "samples", samples[-1])) as f:
    first = json.loads(f.readline())
  assert {"prompt", "response", "reference", "gold_reward"} <= set(first)
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert os.path.exists(os.path.join(workdir, "tokenizer.model"))
  with open(os.path.join(workdir, "data_info.json")) as f:
    assert len(json.load(f)["content_hash"]) == 64
  assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  """Updates turn NaN after 5 optimizer steps: the run stops naming the step and metric."""
  make = optim.make_optimizer

  def poisoned(config, total_steps, **kwargs):
    tx, schedule = make(config, total_steps, **kwargs)

    def update(updates, state, params=None):
      inner, count = state
      updates, inner = tx.update(updates, inner, params)
      scale = jax.numpy.where(count >= 5, jax.numpy.nan, 1.0)
      return jax.tree.map(lambda u: u * scale, updates), (inner, count + 1)

    init = lambda params: (tx.init(params), jax.numpy.zeros((), jax.numpy.int32))
    return optax.GradientTransformation(init, update), schedule

  monkeypatch.setattr(optim, "make_optimizer", poisoned)
  workdir = str(tmp_path / "nan")
  config = _runlocal_config(
    total_steps=20,
    log_every=1,
    checkpoint_every=2,
    eval_every=100,
    **{"data.num_train": 200, "data.num_eval": 16, "eval.num_samples": 4},
  )
  with pytest.raises(metrics.NonFiniteError, match=r"step 6: .*param_norm=nan") as err:
    config_utils.run(config, workdir)
  assert err.value.step == 6
  # Checkpoints at 2 and 4 survive; nothing was saved at or after the bad step.
  assert resume.committed_steps(workdir) == [2, 4]
  _, state = resume.final_state(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
  assert max(r["step"] for r in metrics.read_metrics(workdir)) == 5


def test_malformed_jsonl_names_file_line_and_field(tmp_path):
  data = tmp_path / "sft.jsonl"
  data.write_text(
    '{"prompt": "Review of the lamp:", "response": "It glows."}\n'
    '{"prompt": "Review of the lamp:", "response": 3}\n'
  )
  config = _runlocal_config(**{"data.source": "jsonl", "data.train_jsonl": str(data)})
  with pytest.raises(builders.DataError, match=r"sft.jsonl:2: .*'response'"):
    config_utils.run(config, str(tmp_path / "run"))


def _chat_records(n):
  """Hand-written chats (one and two exchanges, some with a system turn) and plain records."""
  items = ["lamp", "kettle", "backpack", "chair", "mug"]
  verdicts = ["It glows softly.", "It boils fast.", "It holds a lot.", "It is sturdy.", "Nice."]
  records = []
  for i in range(n):
    item, verdict = items[i % 5], verdicts[i % 5]
    if i % 4 == 3:
      records.append({"prompt": f"Review of the {item}:", "response": verdict})
      continue
    turns = [("system", "Be brief.")] if i % 3 == 0 else []
    turns += [("user", f"Review of the {item}:"), ("assistant", verdict)]
    if i % 2:
      turns += [("user", "Anything else?"), ("assistant", f"The {item} is worth it.")]
    records.append({"messages": [{"role": r, "content": c} for r, c in turns]})
  return records


def test_chat_sft_with_packing_runs_end_to_end(tmp_path):
  records = _chat_records(48)
  train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
  train.write_text("".join(json.dumps(r) + "\n" for r in records))
  evals.write_text("".join(json.dumps(r) + "\n" for r in records[:8]))
  workdir = str(tmp_path / "chat")
  config = _runlocal_config(
    total_steps=3,
    batch_size=8,
    max_len=128,
    log_every=1,
    eval_every=3,
    checkpoint_every=3,
    **{
      "data.source": "jsonl",
      "data.train_jsonl": str(train),
      "data.eval_jsonl": str(evals),
      "data.packing": True,
      "optim.warmup_steps": 1,
      "eval.num_samples": 0,  # sampling is tested by the runlocal test
    },
  )
  final = config_utils.run(config, workdir)
  assert np.isfinite(final["eval/loss"])
  with open(os.path.join(workdir, "data_info.json")) as f:
    info = json.load(f)
  assert info["packing"]["examples"] == 48 and info["packing"]["examples_per_pack"] > 1.5
  rows = [r for r in metrics.read_metrics(workdir) if "loss" in r]
  assert len(rows) == 3 and all(r["examples"] > 8 for r in rows)  # more examples than rows

  # With the run's tokenizer, the loss falls on exactly the assistant replies and their EOS.
  tok = tokenizer_lib.Tokenizer.load(os.path.join(workdir, "tokenizer.model"))
  batch = loader.sft_collate(records[:3], tok, config.max_len)
  for row, record in enumerate(records[:3]):
    replies = [t["content"] for t in record["messages"] if t["role"] == "assistant"]
    targets = batch["tokens"][row][batch["loss_mask"][row]].tolist()
    assert targets == [i for r in replies for i in [*tok.encode(r), tok.eos_id]]
