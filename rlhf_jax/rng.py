"""Named random streams: the one table of where every random draw of a run comes from.

A run has two seeds: `config.seed` (model-side draws: initialisation, sampling) and
`config.data.seed` (which data: testbed prompts, held-out splits, labelled pairs). Each
use draws from its own named stream, a fixed offset of its seed, so that adding a new
use never shifts the draws of another and a rerun draws the same numbers:

    rng.key(config.seed, "rollout")          # jax.random.key(config.seed + 7)
    rng.seed(config.data.seed, "eval_prompts")   # config.data.seed + 1 (an int, for NumPy)

Streams that advance per step fold the step in (`jax.random.fold_in(key, step)`). The
offsets are the ones earlier versions used inline, so results are unchanged.
"""

from __future__ import annotations

import jax

# config.seed + offset
MODEL_STREAMS = {
  "init": 0,  # parameters and the trainers' state["rng"] (dropout, shuffles, bootstrap)
  "sft_eval": 1,  # SFT's sampled eval (fold_in step)
  "rollout": 7,  # RL rollouts (fold_in iteration)
  "reward_gold_eval": 11,  # reward model: SFT samples scored against gold
  "normalization": 13,  # reward model: SFT samples that set mean 0, std 1
  "candidates": 13,  # best-of-n: the N samples per prompt (fold_in chunk)
  "eval": 101,  # held-out evaluation samples of every RL method
  "lora": 103,  # fresh LoRA adapters on a loaded model (their A)
  "lora_dropout": 107,  # DPO's LoRA dropout masks (fold_in step)
  "loop_samples": 109,  # the feedback loop's candidate responses (fold_in round, sample)
}

# config.data.seed + offset
DATA_STREAMS = {
  "train_prompts": 0,  # testbed training prompts; the hold-out of prompt files
  "train_pairs": 0,  # testbed preference pairs for training (and their labels)
  "eval_prompts": 1,  # testbed held-out prompts
  "eval_pairs": 1,  # testbed held-out preference pairs
  "normalization_prompts": 3,  # reward model: prompts of the normalisation samples
  "gold_prompts": 5,  # reward model: prompts of the gold correlation eval
  "loop": 7,  # the feedback loop: per round, its prompts, pair selection and panel labels
}


def seed(base: int, stream: str) -> int:
  """`base` + the offset of `stream` (a model or data stream) as an int."""
  if stream in MODEL_STREAMS:
    return base + MODEL_STREAMS[stream]
  if stream in DATA_STREAMS:
    return base + DATA_STREAMS[stream]
  raise KeyError(f"unknown random stream {stream!r}; add it to rlhf_jax/rng.py")


def key(base: int, stream: str) -> jax.Array:
  """The JAX key of `stream` for the run's `base` seed."""
  return jax.random.key(seed(base, stream))
