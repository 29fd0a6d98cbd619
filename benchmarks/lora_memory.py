"""Train-state memory of full fine-tuning against LoRA, per model preset (no compute).

  python -m benchmarks.lora_memory                         # qwen2.5-0.5b, llama3.2-1b, gemma-2b
  python -m benchmarks.lora_memory --presets=llama3.2-1b --ranks=8,64 --param_dtype=bfloat16

For each preset, the state an SFT (or DPO) stage keeps on its devices, from
`jax.eval_shape` of the trainer's own init with the default optimizer (AdamW: two moments
per trained parameter) and the trainer's freezing (`optim.make_optimizer(trainable=...)`):
parameters, optimizer state, and their sum, for full fine-tuning and for LoRA at each
rank on every projection (q, k, v, o, up, gate, down). Gradients and activations are left
out: they are transient and depend on the batch. A DPO stage keeps the same state (its
reference log-probs are precomputed, a few floats per pair); a reward model keeps it per
ensemble member.

PPO (`ppo_*` keys) keeps the policy's state, a separate critic of the same shape with its
own optimizer (trained in full either way) and the reference policy: a copy of the
starting parameters in full fine-tuning, nothing with LoRA (the reference is the frozen
base inside the state, `rl_common.LoraPolicy`); `ppo_head_*` is the same with
`value_model="policy_head"` (a value head on the policy: no critic; the head is negligible).
The reward model, the same in both, is left out.

Prints one JSON line per (preset, mode).
"""

from __future__ import annotations

import json

import jax
import ml_collections
from absl import app, flags

from rlhf_jax import models, optim, sharding
from rlhf_jax.models import lora
from rlhf_jax.trainers import sft

FLAGS = flags.FLAGS
flags.DEFINE_list("presets", ["qwen2.5-0.5b", "llama3.2-1b", "gemma-2b"], "Model presets.")
flags.DEFINE_list("ranks", ["8", "64"], "LoRA ranks.")
flags.DEFINE_string("param_dtype", "float32", "Parameter dtype (the moments follow it).")


def _gib(tree) -> float:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**30


def state_bytes(cfg, rank: int) -> dict[str, float]:
  section = {"rank": rank, "alpha": 16.0, "dropout": 0.0, "targets": ",".join(lora.TARGETS)}
  cfg = lora.with_adapters(cfg, ml_collections.ConfigDict(section))
  module = models.LanguageModel(cfg)
  trainable = lora.TRAINABLE if rank else None
  tx, _ = optim.make_optimizer({}, 100, trainable=trainable)

  def init(key):
    params = sharding.unbox(models.init_params(module, key))
    return sft.init_from(params, key, tx=tx)

  state = jax.eval_shape(init, jax.random.key(0))
  params, opt = state["params"], state["opt_state"]
  plain = jax.eval_shape(
    lambda k: sharding.unbox(models.init_params(models.LanguageModel(lora.plain(cfg)), k)),
    jax.random.key(0),
  )
  full_tx, _ = optim.make_optimizer({}, 100)
  critic = _gib(plain) + _gib(jax.eval_shape(full_tx.init, plain))
  reference = 0.0 if rank else _gib(plain)
  sft_state = _gib(params) + _gib(opt)
  return {
    "params_gib": round(_gib(params), 3),
    "trained_params": lora.num_params(lora.adapters(params)) if rank else lora.num_params(params),
    "opt_state_gib": round(_gib(opt), 3),
    "state_gib": round(sft_state, 3),
    "ppo_reference_gib": round(reference, 3),
    "ppo_critic_gib": round(critic, 3),
    "ppo_state_gib": round(sft_state + critic + reference, 3),
    "ppo_head_state_gib": round(sft_state + reference, 3),  # value_model="policy_head"
  }


def main(argv) -> None:
  del argv
  for preset in FLAGS.presets:
    cfg = models.get_model_config(preset, param_dtype=FLAGS.param_dtype)
    full = state_bytes(cfg, 0)
    print(json.dumps({"preset": preset, "mode": "full", **full}))
    for rank in (int(r) for r in FLAGS.ranks):
      out = state_bytes(cfg, rank)
      out["vs_full"] = round(out["state_gib"] / full["state_gib"], 3)
      out["ppo_vs_full"] = round(out["ppo_state_gib"] / full["ppo_state_gib"], 3)
      out["ppo_head_vs_full"] = round(out["ppo_head_state_gib"] / full["ppo_head_state_gib"], 3)
      print(json.dumps({"preset": preset, "mode": f"lora_r{rank}", **out}))


if __name__ == "__main__":
  app.run(main)
