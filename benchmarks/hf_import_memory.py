"""Peak host memory of importing a Hugging Face checkpoint (`hf.load_policy`).

  python -m benchmarks.hf_import_memory                       # a 168M-parameter Llama, bf16
  python -m benchmarks.hf_import_memory --d_model=2048 --layers=16 --vocab=128256  # ~1.2B

Writes a random Llama-architecture checkpoint in bfloat16 (config.json, one safetensors
file, the tiny test fixture's tokenizer) to a temporary folder, then imports it in a fresh
process on `--devices` fake CPU devices (fsdp: every parameter split across them) and
reports the import's wall time and that process's peak resident memory above its state
just before the import,
against the sizes that bound it: the checkpoint in its storage dtype, the parameters in
float32 on the devices (on CPU, device memory is host memory) and the largest tensor.

The importer reads each tensor once per parameter and converts it shard by shard on the
devices, so the peak should stay near the float32 parameters plus one stacked parameter in
bfloat16, far under what reading the whole checkpoint and upcasting it on the host costs
(storage + float32 + the device copy).

Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("d_model", 1024, "Width.")
flags.DEFINE_integer("layers", 8, "Layers.")
flags.DEFINE_integer("vocab", 32000, "Embedding rows (the tokenizer uses the first few).")
flags.DEFINE_integer("devices", 8, "Fake CPU devices to shard over.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "hf", "llama")

_CHILD = r"""
import json, os, resource, sys, time
import jax
from rlhf_jax import hf, sharding
mesh = sharding.make_mesh((1, -1, 1))
kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
jax.block_until_ready(jax.numpy.zeros(1))
before = kib()
start = time.perf_counter()
policy = hf.load_policy("hf:" + sys.argv[1], mesh)
jax.block_until_ready(policy.params)
seconds = time.perf_counter() - start
print(json.dumps({"rss_before_mib": before / 1024, "peak_mib": kib() / 1024, "seconds": seconds}))
"""


def write_checkpoint(directory: str) -> dict[str, float]:
  import jax
  import jax.numpy as jnp
  from safetensors.flax import save_file

  d, layers, vocab = FLAGS.d_model, FLAGS.layers, FLAGS.vocab
  heads, kv, mlp = d // 64, d // 256, int(d * 2.75)
  shapes = {"model.embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d),
            "model.norm.weight": (d,)}  # fmt: skip
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes.update({
      p + "self_attn.q_proj.weight": (heads * 64, d),
      p + "self_attn.k_proj.weight": (kv * 64, d),
      p + "self_attn.v_proj.weight": (kv * 64, d),
      p + "self_attn.o_proj.weight": (d, heads * 64),
      p + "mlp.gate_proj.weight": (mlp, d),
      p + "mlp.up_proj.weight": (mlp, d),
      p + "mlp.down_proj.weight": (d, mlp),
      p + "input_layernorm.weight": (d,),
      p + "post_attention_layernorm.weight": (d,),
    })  # fmt: skip
  key = jax.random.key(0)
  tensors = {
    name: (0.02 * jax.random.normal(jax.random.fold_in(key, i), shape)).astype(jnp.bfloat16)
    for i, (name, shape) in enumerate(shapes.items())
  }
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  with open(os.path.join(FIXTURE, "config.json")) as f:
    config = json.load(f)
  config.update(hidden_size=d, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=64,
                vocab_size=vocab, tie_word_embeddings=False, dtype="bfloat16")  # fmt: skip
  config.pop("torch_dtype", None)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  for name in os.listdir(FIXTURE):
    if name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
      shutil.copy(os.path.join(FIXTURE, name), directory)
  sizes = [2 * _numel(s) for s in shapes.values()]
  stacked = max(layers * 2 * _numel(shapes["model.layers.0." + n]) for n in
                ("self_attn.q_proj.weight", "mlp.up_proj.weight"))  # fmt: skip
  return {
    "params_m": round(sum(sizes) / 2 / 1e6, 1),
    "storage_bf16_mib": round(sum(sizes) / 2**20, 1),
    "params_f32_mib": round(2 * sum(sizes) / 2**20, 1),
    "largest_tensor_bf16_mib": round(max(sizes) / 2**20, 1),
    "largest_stacked_param_bf16_mib": round(max(stacked, max(sizes)) / 2**20, 1),
  }


def _numel(shape) -> int:
  n = 1
  for x in shape:
    n *= x
  return n


def main(argv) -> None:
  del argv
  with tempfile.TemporaryDirectory() as directory:
    sizes = write_checkpoint(directory)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={FLAGS.devices}")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", _CHILD, directory], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    child = json.loads(out.stdout.strip().splitlines()[-1])
  growth = child["peak_mib"] - child["rss_before_mib"]
  print(json.dumps({
    **sizes,
    "devices": FLAGS.devices,
    "peak_growth_mib": round(growth, 1),
    "peak_growth_over_f32_params": round(growth / sizes["params_f32_mib"], 2),
    "import_s": round(child["seconds"], 1),
  }))  # fmt: skip


if __name__ == "__main__":
  app.run(main)
