"""SFT training throughput with and without sequence packing, on the testbed corpus.

  python -m benchmarks.packing                       # configs/sft.py's default shape
  python -m benchmarks.packing --num_train=8000 --steps=40 --rounds=3

Builds the SFT data exactly as the trainer does (testbed corpus, TFDS build, tokenizer
trained on it, rows that do not fit left out, `sft.make_train_loader`) at
configs/sft.py's default shape (batch 32, max_len 64, its model), then times training
steps (next batch from the loader + jitted update, as the train loop runs them) for
unpacked rows and for packs of examples. The two modes alternate over `--rounds` rounds
and the median round is reported, so load from other processes on the machine hits
both alike. Compilation is excluded (each mode runs `--warmup` steps first).

Prints one JSON line per mode: examples/s, loss tokens/s (targets of the loss), real
tokens/s, step time, and the padding fraction, both over the timed batches and over the
whole epoch (`packing.pack_stats`); then one line with the packed/unpacked ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import optax
from absl import app, flags

from configs import sft as sft_config
from rlhf_jax import models, optim, sharding
from rlhf_jax.data import lengths
from rlhf_jax.trainers import common, sft

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_train", None, "Testbed examples (default: configs/sft.py's).")
flags.DEFINE_integer("steps", 50, "Timed steps per mode and round.")
flags.DEFINE_integer("warmup", 3, "Untimed steps per mode first (compilation).")
flags.DEFINE_integer("rounds", 3, "Alternating rounds of both modes; the median is reported.")
flags.DEFINE_string("workdir", "", "Where the corpus and tokenizer go (default: a temp dir).")


def _make_step(config, module, tx):
  def update(state, batch):
    params, opt_state = state
    (loss, _), grads = jax.value_and_grad(lambda p: sft.sft_loss(module, p, batch), has_aux=True)(
      params
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return jax.jit(update, donate_argnums=(0,))


class Mode:
  """One way of feeding the trainer (unpacked or packed): its loader, step and counts."""

  def __init__(self, name, config, train_source, tok, module, tx, params):
    self.name = name
    self.loader, self.stats = sft.make_train_loader(config, train_source, tok)
    self.step = _make_step(config, module, tx)
    params = jax.tree.map(np.array, params)  # a copy of its own: the step donates its state
    self.state = (params, tx.init(params))
    self.rounds: list[float] = []
    self.examples = self.loss_tokens = self.tokens = self.slots = 0

  def run(self, steps: int, count: bool) -> float:
    """Runs `steps` steps; returns their wall time (counting their batches if `count`)."""
    start = time.perf_counter()
    loss = None
    for _ in range(steps):
      batch = sft._model_inputs(next(self.loader))
      self.state, loss = self.step(self.state, batch)
      if count:
        self.examples += int(sft.count_examples(jax.tree.map(np.asarray, batch)))
        self.loss_tokens += int(batch["loss_mask"].sum())
        self.tokens += int(batch["input_mask"].sum())
        self.slots += batch["input_mask"].size
    jax.block_until_ready(loss)
    return time.perf_counter() - start

  def report(self, steps: int) -> dict:
    seconds = statistics.median(self.rounds)
    per_step = lambda total: total / (len(self.rounds) * steps)  # counts are over all rounds
    return dict(
      bench="sft_packing",
      mode=self.name,
      step_s=seconds / steps,
      examples_per_s=per_step(self.examples) * steps / seconds,
      loss_tokens_per_s=per_step(self.loss_tokens) * steps / seconds,
      tokens_per_s=per_step(self.tokens) * steps / seconds,
      examples_per_step=per_step(self.examples),
      padding_fraction=1.0 - self.tokens / self.slots,
      epoch_padding_fraction=self.stats["padding_fraction"],
      round_s=self.rounds,
    )


def main(argv):
  del argv
  config = sft_config.get_config()
  with config.unlocked():
    if FLAGS.num_train is not None:
      config.data.num_train = FLAGS.num_train
    config.data.num_eval = 0
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="bench_packing_")
  os.makedirs(workdir, exist_ok=True)

  train_source, _, _ = sft.prepare_data(config, workdir)
  tok = common.get_tokenizer(config, workdir, lambda: sft.tokenizer_texts(train_source))
  fitting, report = lengths.keep_fitting(
    {"train": train_source},
    lengths.sft_fit(tok, config.max_len, config.data.train_on),
    what="examples",
    max_len=config.max_len,
  )
  train_source = fitting["train"]

  module = models.LanguageModel(common.model_config(config.model, tok.vocab_size))
  tx, _ = optim.make_optimizer(config.optim, config.total_steps)
  params = jax.jit(lambda r: sharding.unbox(models.init_params(module, r)))(jax.random.key(0))
  modes = []
  for name, packed in (("unpacked", False), ("packed", True)):
    mode_config = config.copy_and_resolve_references()
    mode_config.data.packing = packed
    modes.append(Mode(name, mode_config, train_source, tok, module, tx, params))
  # The unpacked loader's epoch: one example per row.
  modes[0].stats = {"padding_fraction": modes[1].stats["unpacked_padding_fraction"]}
  for mode in modes:
    mode.run(FLAGS.warmup, count=False)
  for _ in range(FLAGS.rounds):
    for mode in modes:
      mode.rounds.append(mode.run(FLAGS.steps, count=True))

  setup = dict(
    num_train=config.data.num_train,
    kept=len(train_source),
    dropped=report["train"]["dropped"],
    batch=config.batch_size,
    max_len=config.max_len,
    params=sum(x.size for x in jax.tree.leaves(params)),
    device=jax.devices()[0].device_kind,
    packs=modes[1].stats["packs"],
    examples_per_pack=modes[1].stats["examples_per_pack"],
  )
  results = [{**setup, **mode.report(FLAGS.steps)} for mode in modes]
  for result in results:
    print(json.dumps(result), flush=True)
  unpacked, packed = results
  ratios = {
    key: packed[key] / unpacked[key]
    for key in ("examples_per_s", "loss_tokens_per_s", "tokens_per_s", "step_s")
  }
  print(json.dumps({"bench": "sft_packing", "packed_over_unpacked": ratios}), flush=True)


if __name__ == "__main__":
  app.run(main)
