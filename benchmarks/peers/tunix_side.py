"""Tunix's side of the peer benchmark (its own environment; see run.sh):
`python benchmarks/peers/tunix_side.py --task=ppo`.

A PPO iteration of Tunix's `PPOLearner` on its Llama 3 model at the shape of `shape.py`:
actor, separate critic (Tunix's `create_critic_model`), reference and a reward model (a Llama
trunk with a scalar head), the vanilla rollout engine with its KV cache, one epoch over one
minibatch of 64, Adam. Each global step (one iteration) is timed; the first two (compiling)
are left out.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import numpy as np
import optax
import shape
from flax import nnx
from grain import python as grain
from tunix.models.llama3 import model as llama3
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl import utils
from tunix.rl.ppo import ppo_learner
from tunix.rl.rollout import base_rollout
from tunix.tests import test_common as tc

WARMUP = 2
ROLES = [rl_cluster_lib.Role[r] for r in ("ACTOR", "CRITIC", "REFERENCE", "ROLLOUT", "REWARD")]


def words() -> dict[str, int]:
  """A word-level vocabulary of `shape.VOCAB` ids for Tunix's test tokenizer."""
  mapping = {"<pad>": shape.PAD, "<s>": shape.BOS, "</s>": shape.EOS}
  mapping.update({f"w{i}": i for i in range(3, shape.VOCAB)})
  return mapping


def model(seed: int):
  config = llama3.ModelConfig(
    num_layers=shape.LAYERS, vocab_size=shape.VOCAB, embed_dim=shape.WIDTH,
    hidden_dim=shape.MLP, num_heads=shape.HEADS, head_dim=shape.HEAD_DIM,
    num_kv_heads=shape.HEADS, rope_theta=int(shape.ROPE_THETA), norm_eps=shape.NORM_EPS,
  )  # fmt: skip
  return llama3.Llama3(config, rngs=nnx.Rngs(seed))


class ScalarLlama(nnx.Module):
  """A Llama trunk with a scalar head, called as Tunix calls a critic or reward model.

  Tunix 0.1.7's `compute_score` passes `segment_ids`, which its Llama 3 does not take; with
  unpacked rows they say no more than the attention mask, so they are dropped here.
  """

  def __init__(self, seed: int):
    self.model = utils.create_critic_model(model(seed), seed=seed + 1)

  def __call__(self, tokens, positions, cache=None, attention_mask=None, segment_ids=None):
    del segment_ids
    return self.model(tokens, positions, cache, attention_mask)


class Prompts(grain.RandomAccessDataSource):
  def __init__(self, rows: int):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, shape.VOCAB, (rows, shape.PROMPT_LEN - 1))  # Tunix adds BOS
    self._prompts = [" ".join(f"w{i}" for i in row) for row in ids]

  def __getitem__(self, idx):
    return self._prompts[idx]

  def __len__(self):
    return len(self._prompts)


def main() -> None:
  task, repeats = shape.parse_args()
  if task != "ppo":
    raise SystemExit("tunix_side.py runs --task=ppo only")
  steps = WARMUP + repeats
  actor, reference = model(0), model(0)
  critic, reward = ScalarLlama(0), ScalarLlama(2)
  # Tunix's models name the axes "fsdp" and "tp" and shard by them (Auto axes, as its tests).
  auto = jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(auto, auto))
  rollout = base_rollout.RolloutConfig(
    max_tokens_to_generate=shape.NEW_TOKENS, max_prompt_length=shape.PROMPT_LEN,
    kv_cache_size=shape.PROMPT_LEN + shape.NEW_TOKENS + 8, temperature=1.0,
  )  # fmt: skip
  cluster = rl_cluster_lib.RLCluster(
    actor=actor,
    critic=critic,
    reference=reference,
    reward=reward,
    tokenizer=tc.MockVocab(words()),
    cluster_config=rl_cluster_lib.ClusterConfig(
      role_to_mesh={r: mesh for r in ROLES},
      rollout_engine="vanilla",
      offload_to_cpu=False,
      training_config=rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.adam(shape.LR),
        critic_optimizer=optax.adam(shape.LR),
        eval_every_n_steps=10**6,
        max_steps=steps,
      ),
      rollout_config=rollout,
    ),
  )
  learner = ppo_learner.PPOLearner(
    rl_cluster=cluster, ppo_config=ppo_learner.PPOConfig(num_iterations=1, beta=0.05)
  )
  times: list[float] = []
  run_global_step = learner._run_global_step  # one iteration: rollout, scoring, updates

  def timed_step(*args, **kwargs):
    start = time.perf_counter()
    out = run_global_step(*args, **kwargs)
    jax.block_until_ready(nnx.state(actor))
    times.append(time.perf_counter() - start)
    return out

  learner._run_global_step = timed_step
  data = (
    grain.MapDataset.source(Prompts(shape.ROLLOUTS * steps))
    .batch(shape.ROLLOUTS)
    .map(lambda x: {"prompts": x, "answer": x})
  )
  learner.train(data)
  measured = sorted(times[WARMUP:])
  if not measured:
    raise SystemExit(f"Tunix ran {len(times)} global steps, fewer than {WARMUP + 1}")
  import tunix

  version = getattr(tunix, "__version__", "")
  shape.emit("tunix", task, measured[len(measured) // 2], tunix=version, jax=jax.__version__)


if __name__ == "__main__":
  main()
