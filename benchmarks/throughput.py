"""Training-step and decoding throughput for a named model preset.

  python -m benchmarks.throughput --model=tiny
  python -m benchmarks.throughput --model=gpt2-small --batch=8 --seq_len=256
  python -m benchmarks.throughput --model=gpt2-medium --dtype=bfloat16 --batch=32 --seq_len=1024

Prints one JSON line for the training step (tokens/s, analytic FLOPs per step,
MFU against the device's stated peak) and one for sampler decoding (new
tokens/s at the given batch size). Timings exclude compilation: each function
runs once to compile, then `--steps` timed repetitions, blocking on results.
All devices are used, on a mesh of (1, -1, 1) with the FSDP rules, unless
`--mesh` and `--rules` say otherwise.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import app, flags

from benchmarks.train_step import time_fn as _time
from benchmarks.train_step import time_train_step
from rlhf_jax import metrics, models, sharding
from rlhf_jax.rl import sampler

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "tiny", f"Model preset: {sorted(models.PRESETS)}.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "Rematerialisation policy.")
flags.DEFINE_integer("batch", 8, "Global batch size for the training step.")
flags.DEFINE_integer("seq_len", 128, "Training sequence length.")
flags.DEFINE_integer("steps", 5, "Timed repetitions (after one compile run).")
flags.DEFINE_integer("decode_batch", 8, "Batch size for decoding.")
flags.DEFINE_integer("prompt_len", 32, "Prompt length for decoding.")
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per sequence.")
flags.DEFINE_list("mesh", ["1", "-1", "1"], "Mesh shape (data, fsdp, tensor).")
flags.DEFINE_string("rules", "fsdp", f"Sharding rules preset: {sorted(sharding.RULE_PRESETS)}.")
flags.DEFINE_bool("skip_decode", False, "Only benchmark the training step.")


def bench_train(cfg, mesh, rules) -> dict:
  seconds = time_train_step(cfg, mesh, rules, FLAGS.batch, FLAGS.seq_len, FLAGS.steps)
  n_tokens = FLAGS.batch * FLAGS.seq_len
  flops = cfg.train_flops_per_token(FLAGS.seq_len) * n_tokens
  peak, peak_note = metrics.peak_flops_per_device(jax.devices()[0], cfg.dtype)
  return dict(
    bench="train_step",
    step_s=seconds,
    tokens_per_s=n_tokens / seconds,
    flops_per_step=flops,
    tflops_per_s=flops / seconds / 1e12,
    mfu=metrics.mfu(flops, seconds, mesh.size, peak),
    peak_flops_per_device=peak,
    peak_source=peak_note,
    batch=FLAGS.batch,
    seq_len=FLAGS.seq_len,
  )


def bench_decode(cfg, mesh, rules) -> dict:
  module = models.LanguageModel(cfg)
  params, shardings = sharding.init_sharded(
    lambda r: models.init_params(module, r), mesh, rules, jax.random.key(0)
  )
  config = sampler.SamplerConfig(
    max_new_tokens=FLAGS.new_tokens, eos_id=1, pad_id=0, temperature=1.0
  )
  fn = sampler.make_sampler(module, config, mesh=mesh, rules=rules, param_shardings=shardings)
  rng = np.random.default_rng(0)
  # Token ids >= 2 so no prompt contains EOS; sampling may still stop early
  # only if every row emits EOS, which a random model does rarely.
  prompts = rng.integers(2, cfg.vocab_size, (FLAGS.decode_batch, FLAGS.prompt_len), np.int32)
  mask = np.ones_like(prompts, dtype=bool)
  out = {}

  def run():
    out["o"] = fn(params, prompts, mask, jax.random.key(1))
    return out["o"].tokens

  seconds = _time(run, FLAGS.steps)
  generated = int(np.asarray(out["o"].lengths).sum())
  return dict(
    bench="decode",
    call_s=seconds,
    new_tokens_per_s=generated / seconds,
    generated_tokens=generated,
    batch=FLAGS.decode_batch,
    prompt_len=FLAGS.prompt_len,
    new_tokens=FLAGS.new_tokens,
  )


def main(argv):
  del argv
  cfg = models.get_model_config(
    FLAGS.model, dtype=FLAGS.dtype, param_dtype=FLAGS.param_dtype, remat=FLAGS.remat
  )
  mesh = sharding.make_mesh([int(s) for s in FLAGS.mesh])
  common = dict(
    model=FLAGS.model,
    params=cfg.num_params(),
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    device_kind=jax.devices()[0].device_kind,
    num_devices=mesh.size,
    mesh=dict(mesh.shape),
    rules=FLAGS.rules,
    jax=jax.__version__,
  )
  print(json.dumps({**common, **bench_train(cfg, mesh, FLAGS.rules)}), flush=True)
  if not FLAGS.skip_decode:
    print(json.dumps({**common, **bench_decode(cfg, mesh, FLAGS.rules)}), flush=True)


if __name__ == "__main__":
  app.run(main)
