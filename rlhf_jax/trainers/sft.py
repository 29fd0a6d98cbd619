"""Supervised fine-tuning: next-token loss on response (assistant) tokens only.

    python -m experiments.launch --config=configs/sft.py

The module-level functions are the method: `sft_loss`, `init_state`, `update` and the
`Evaluator` (held-out loss and samples); `train` prepares the data and the tokenizer
and wires them to the loop every trainer shares (`rlhf_jax.trainers.common`). The run
is exactly resumable: parameters, optimizer state, step, RNG key and the data loader's
position are checkpointed, and a rerun with the same workdir continues from the latest
checkpoint with the same batches.

Records are prompt/response pairs or chats (`messages`; `config.data.train_on` says which
assistant turns carry the loss, see `rlhf_jax.data.chat.sft_pieces`). With
`config.data.packing` several examples share a row (`rlhf_jax.data.packing`): each step
then trains on more examples for the same compute, with the same loss per example.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from rlhf_jax import config_spec as cs
from rlhf_jax import distributed, exporters, hf, models, optim, rng, sharding, stages, utils
from rlhf_jax.data import builders, chat, lengths, packing
from rlhf_jax.data import loader as loader_lib
from rlhf_jax.data import prompts as prompts_lib
from rlhf_jax.models import lora
from rlhf_jax.rl import sampler as sampler_lib
from rlhf_jax.rl.logprobs import shift_for_next_token, token_logprobs
from rlhf_jax.trainers import common

# Metrics that depend on wall-clock time; everything else is deterministic
# and must be identical between an interrupted-and-resumed run and a straight one.
TIMING_METRICS = ("tokens_per_s", "steps_per_s", "mfu", "step_time_s")

DATA_SOURCES = ("testbed", "jsonl")


def _check_data(data, prefix: str) -> None:
  if data.source == "jsonl" and not data.train_jsonl:
    raise cs.ConfigError(f"{prefix}.train_jsonl is empty but {prefix}.source='jsonl'.")


# One declared check per field of configs/sft.py (see rlhf_jax/config_spec.py).
CONFIG_SPEC = cs.Spec(
  {
    "exporters": exporters.CONFIG_SPEC,
    **cs.RUN_FIELDS,
    **cs.LOOP_FIELDS,
    "batch_size": cs.Int(min=1),
    "max_len": cs.Int(min=3),
    "policy_init": cs.FinishedStage("policy"),
    "data": cs.Spec(
      {
        "source": cs.Choice(*DATA_SOURCES),
        "num_train": cs.Int(min=1),
        "num_eval": cs.Int(min=0),
        "seed": cs.Int(min=0),
        "testbed": prompts_lib.TestbedSection(),
        "train_jsonl": cs.Path("file"),
        "eval_jsonl": cs.Path("file"),
        "skip_invalid": cs.Bool(),
        "data_dir": cs.Str(),
        "train_on": cs.Choice(*chat.TRAIN_ON),
        "packing": cs.Bool(),
      },
      checks=(_check_data,),
    ),
    "tokenizer": common.TOKENIZER_SPEC,
    "model": models.CONFIG_SPEC,
    "optim": optim.CONFIG_SPEC,
    "lora": lora.CONFIG_SPEC,
    "eval": cs.Spec(
      {
        "num_samples": cs.Int(min=0),
        "temperature": cs.Float(gt=0),
        "max_new_tokens": cs.Int(min=1),
        "prompt_len": cs.Int(min=1),
      }
    ),
  },
  checks=(
    optim.check_steps("optim", lambda c: c.total_steps),
    cs.mesh_batch("batch_size"),
    lora.needs_start("policy_init"),
  ),
)


def sft_loss(module, params, batch, rngs=None):
  """Mean next-token NLL over the batch's target tokens (loss_mask), float32.

  batch: tokens [B, T] int32, input_mask [B, T] bool, loss_mask [B, T] bool
  (True where the token is a target: response tokens and EOS), and for packed rows
  segment_ids [B, T] int32 (`packing.pack_collate`): attention stays within each example
  and positions restart at 0 for each, so every example is computed as it would be alone.

  The mean is over every target token of the batch (not per row or per example), so the
  loss of a batch of packs equals the loss of the same examples unpacked; a packed row's
  first token of an example is never a target, so no example is predicted from another.
  """
  tokens, input_mask = batch["tokens"], batch["input_mask"]
  if "segment_ids" in batch:
    positions = models.positions_from_segments(batch["segment_ids"])
    attn_mask = models.segment_attention_mask(batch["segment_ids"])
  else:
    positions = models.positions_from_mask(input_mask)
    attn_mask = models.causal_attention_mask(input_mask)
  logits, _ = module.apply({"params": params}, tokens, positions, attn_mask, rngs=rngs)
  targets, target_mask = shift_for_next_token(tokens, batch["loss_mask"])
  nll = -token_logprobs(logits, targets)
  return common.masked_mean(nll, target_mask), jnp.sum(target_mask)


def count_examples(batch) -> jax.Array:
  """Examples in a batch: segments of packed rows, else rows with tokens."""
  if "segment_ids" in batch:
    segments = batch["segment_ids"]
    starts = segments[:, 1:] != segments[:, :-1]
    return jnp.sum(segments[:, 0] != 0) + jnp.sum(starts & (segments[:, 1:] != 0))
  return jnp.sum(jnp.any(batch["input_mask"], axis=1))


def prepare_data(config, workdir):
  """The train/eval sources: the testbed's SFT corpus, or local JSONL files.

  Both go through the same TFDS builder (array_record), so a run records the
  content hash of exactly the data it used.
  """
  data = config.data
  if data.source == "testbed":
    from rlhf_jax.data import testbed

    directory = os.path.join(workdir, "data")
    # Process 0 writes the corpus; the others wait for it and read the same files.
    paths = distributed.primary_first(
      "sft-testbed-corpus",
      lambda: testbed.write_sft_jsonl(
        directory, data.num_train, data.num_eval, data.seed, config=data.get("testbed")
      ),
      others=lambda: testbed.sft_jsonl_paths(directory, data.num_train, data.num_eval),
    )
  elif data.source == "jsonl":
    paths = {"train": [data.train_jsonl]}
    if data.eval_jsonl:
      paths["eval"] = [data.eval_jsonl]
  else:
    raise cs.ConfigError(f"config.data.source={data.source!r}; expected 'testbed' or 'jsonl'.")
  data_dir = data.data_dir or os.path.join(workdir, "data", "tfds")
  builder = builders.build_sft_jsonl(paths, data_dir, skip_invalid=data.skip_invalid)
  train = builder.source("train")
  evals = builder.source("eval") if "eval" in paths else None
  info = {
    "content_hash": builder.content_hash,
    "paths": {k: [str(p) for p in v] for k, v in paths.items()},
    "skipped": builder.num_skipped,
    "num_train": len(train),
    "num_eval": len(evals) if evals is not None else 0,
  }
  return train, evals, info


# ------------------------------------------------------ state and update step


def init_state(key: jax.Array, *, module, tx) -> dict[str, Any]:
  """A fresh train state: parameters (logically boxed), optimizer state, step, RNG key."""
  init_rng, key = jax.random.split(key)
  params = models.init_params(module, init_rng)
  return dict(
    params=params,
    opt_state=tx.init(sharding.unbox(params)),
    step=jnp.zeros((), jnp.int32),
    rng=key,
  )


def init_from(params, key: jax.Array, *, tx) -> dict[str, Any]:
  """A fresh train state from a starting policy's (plain) parameters."""
  return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), rng=key)


def state_shardings(abstract: dict[str, Any], mesh, rules) -> dict[str, Any]:
  """The state's shardings: parameters by their logical axes (`config.sharding_rules`),
  optimizer moments as their parameters, scalars replicated. Call inside `use_mesh`."""
  params = abstract["params"]
  param_sh = sharding.tree_shardings(params, sharding.logical_specs(params), mesh, rules)
  rep = common.replicated(mesh)
  return dict(
    params=param_sh,
    opt_state=common.mirror_shardings(abstract["opt_state"], params, param_sh, mesh),
    step=rep,
    rng=rep,
  )


def update(state, batch, *, module, tx, schedule, accum: int = 1):
  """One optimizer step on `batch` (`sft_loss`): the new state and the step's metrics.

  `accum`: micro-steps per optimizer step (optax.MultiSteps), so the learning rate is
  read at step // accum.
  """
  # LoRA dropout (the only dropout) draws from the step's key; a no-op without it.
  rngs = {"dropout": jax.random.fold_in(state["rng"], state["step"])}
  frozen = lora.trainable(module.config)  # LoRA: gradients of the adapters only
  (loss, num_targets), grads = jax.value_and_grad(
    lambda p: sft_loss(module, lora.stop_frozen(p, frozen), batch, rngs), has_aux=True
  )(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  step_metrics = dict(
    loss=loss,
    examples=count_examples(batch),
    lr=schedule(state["step"] // accum),
    grad_norm=optim.l2_norm(grads),
    param_norm=optim.l2_norm(params),
    update_norm=optim.l2_norm(updates),
    target_tokens=num_targets,
  )
  new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1, rng=state["rng"])
  return new_state, step_metrics


# ------------------------------------------------------------------- evaluation


class Evaluator:
  """`evaluator(params, step)`: the held-out loss and samples of the policy.

  eval/loss is the mean next-token loss over every target token of the eval split (when
  there is one); then the first `config.eval.num_samples` eval prompts (else training
  prompts) are sampled, their length and missing-EOS rate reported (and on the testbed
  their gold reward), and the samples written to `<workdir>/samples/step_<step>.jsonl`.
  """

  def __init__(self, config, workdir, module, tok, sources, param_sh, mesh):
    self.config, self.workdir, self.tok, self.mesh = config, workdir, tok, mesh
    self.rules = config.sharding_rules
    self.train_source, self.eval_source = sources
    batch_sh = sharding.batch_sharding(mesh, 2)
    # Evaluation always reads unpacked rows.
    self.loss_fn = jax.jit(
      lambda params, batch: sft_loss(module, params, batch),
      in_shardings=(param_sh, {key: batch_sh for key in MODEL_INPUTS}),
    )
    self.collate = functools.partial(
      loader_lib.sft_collate, tokenizer=tok, max_len=config.max_len, train_on=config.data.train_on
    )
    self.sampler = sampler_lib.make_sampler(
      module,
      sampler_lib.SamplerConfig(
        max_new_tokens=config.eval.max_new_tokens,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        temperature=config.eval.temperature,
        num_valid=tok.vocab_size,
      ),
      mesh=mesh,
      rules=self.rules,
      param_shardings=param_sh,
    )

  def __call__(self, params, step: int) -> dict[str, float]:
    return {**self.loss(params), **self.samples(params, step)}

  def loss(self, params) -> dict[str, float]:
    if self.eval_source is None:
      return {}
    loader = loader_lib.Loader(
      self.eval_source,
      global_batch_size=self.config.batch_size,
      shuffle=False,
      drop_remainder=False,
      num_epochs=1,
      collate=self.collate,
    )
    total, count = 0.0, 0.0
    with sharding.use_mesh(self.mesh, self.rules):
      for batch in loader:
        batch = _pad_rows(_model_inputs(batch), loader.local_batch_size, self.tok.pad_id)
        loss, n = self.loss_fn(params, sharding.host_to_global(batch, self.mesh))
        total += float(loss) * float(n)
        count += float(n)
    return {"eval/loss": total / max(count, 1.0)}

  def samples(self, params, step: int) -> dict[str, float]:
    config, tok, mesh = self.config, self.tok, self.mesh
    source = self.eval_source if self.eval_source is not None else self.train_source
    n = min(config.eval.num_samples, len(source))
    if n == 0:
      return {}
    examples = [source[i] for i in range(n)]
    prompts = [loader_lib.record_prompt(e, tok) for e in examples]
    tokens, mask = common.left_pad_prompts(tok, prompts, config.eval.prompt_len)
    tokens, mask = _pad_prompt_rows(tokens, mask, _round_up(n, _batch_divisor(mesh)), tok)
    key = jax.random.fold_in(rng.key(config.seed, "sft_eval"), step)
    with sharding.use_mesh(mesh, self.rules):
      out = self.sampler(
        params, sharding.global_from_full(tokens, mesh), sharding.global_from_full(mask, mesh), key
      )
    texts = tok.decode_batch(sharding.fetch(out.tokens)[:n])
    result = {
      "eval/response_length": float(sharding.fetch(out.lengths)[:n].mean()),
      "eval/frac_no_eos": float(1.0 - sharding.fetch(out.has_eos)[:n].mean()),
    }
    gold = [None] * n
    if config.data.source == "testbed":
      from rlhf_jax.data import testbed

      pairs = zip(prompts, texts, strict=True)
      gold = [testbed.gold_reward(p, r, config.data.testbed) for p, r in pairs]
      result["eval/gold_reward"] = float(np.mean(gold))
    if jax.process_index() == 0:
      records = []
      for e, p, r, g in zip(examples, prompts, texts, gold, strict=True):
        rec = {"step": step, "prompt": p, "response": r, "reference": _text(e["response"])}
        if g is not None:
          rec["gold_reward"] = g
        records.append(rec)
      path = os.path.join(self.workdir, "samples", f"step_{step:07d}.jsonl")
      utils.write_jsonl_atomic(path, records)
    return result


# ------------------------------------------------------------------------ train


def train(config: Any, workdir: str) -> dict[str, float]:
  """Trains the policy with SFT; returns the final eval metrics."""
  # Config errors surface before any data is built.
  CONFIG_SPEC.validate(config)
  tx, schedule = optim.make_optimizer(
    config.optim, config.total_steps, trainable=lora.trainable(config.lora.rank)
  )
  accum = int(config.optim.get("grad_accum_steps", 1) or 1)
  os.makedirs(workdir, exist_ok=True)
  clock_start = time.perf_counter()
  mesh, rules = common.mesh_from_config(config), config.sharding_rules
  logging.info("Mesh %s, rules %s, %d devices", dict(mesh.shape), rules, mesh.size)

  # ------------------------------------------------- start, data, tokenizer
  start = None
  if config.policy_init:  # a Hugging Face model takes the model section's compute fields
    compute = {k: config.model[k] for k in hf.COMPUTE_FIELDS if config.model.get(k) is not None}
    start = stages.load_policy(config.policy_init, mesh, rules, **compute)
  train_source, eval_source, data_info = prepare_data(config, workdir)
  if start is None:
    tok = common.get_tokenizer(config, workdir, lambda: tokenizer_texts(train_source))
  else:  # the starting policy's own tokenizer
    tok = start.tokenizer
    if jax.process_index() == 0:
      tok.save(os.path.join(workdir, tok.filename))
  # Rows too long for max_len are counted per file and left out, so every row of every
  # batch has target tokens; none left is an error (not 0-loss steps on padding).
  fitting, data_info["lengths"] = lengths.keep_fitting(
    {"train": train_source, "eval": eval_source},
    lengths.sft_fit(tok, config.max_len, config.data.train_on),
    what="examples",
    max_len=config.max_len,
  )
  train_source, eval_source = fitting["train"], fitting["eval"]
  train_loader, data_info["packing"] = make_train_loader(config, train_source, tok)
  if jax.process_index() == 0:
    common.write_json_atomic(os.path.join(workdir, "data_info.json"), data_info)
  logging.info("Data: %s", data_info)

  with common.open_run(config, workdir, mesh, train_loader, clock_start=clock_start) as run:
    # ------------------------------------------- model, state, jitted programs
    key = rng.key(config.seed, "init")
    if start is None:
      model_cfg = common.model_config(config.model, tok.vocab_size)
      module = models.LanguageModel(model_cfg)
      init = functools.partial(init_state, module=module, tx=tx)
      with sharding.use_mesh(mesh, rules):
        state_sh = state_shardings(jax.eval_shape(init, key), mesh, rules)
        init_fn = jax.jit(lambda k: sharding.unbox(init(k)), out_shardings=state_sh)
        abstract = common.with_shardings(jax.eval_shape(init_fn, key), state_sh)
    else:
      module, params, param_sh = start.module, start.params, start.shardings
      if config.lora.rank:  # fresh adapters on the starting policy; only they train
        lora_key = rng.key(config.seed, "lora")
        module, params, param_sh = common.add_lora(
          module, params, config.lora, lora_key, mesh, rules
        )
      model_cfg = module.config
      init = functools.partial(init_from, tx=tx)
      shapes = jax.eval_shape(init, params, key)
      rep = common.replicated(mesh)
      opt_sh = common.mirror_shardings(shapes["opt_state"], params, param_sh, mesh)
      state_sh = dict(params=param_sh, opt_state=opt_sh, step=rep, rng=rep)
      init_fn = jax.jit(lambda k: init(params, k), out_shardings=state_sh)
      abstract = common.with_shardings(jax.eval_shape(init_fn, key), state_sh)
    logging.info("Model %s: %d parameters", model_cfg, common.tree_size(abstract["params"]))
    batch_sh = sharding.batch_sharding(mesh, 2)
    update_fn = jax.jit(
      functools.partial(update, module=module, tx=tx, schedule=schedule, accum=accum),
      in_shardings=(state_sh, {k: batch_sh for k in _input_keys(config.data.packing)}),
      out_shardings=(state_sh, common.replicated(mesh)),
      donate_argnums=(0,),
    )
    state, clock = common.restore_or_init(run, abstract, lambda: init_fn(key))

    # ----------------------------------------------------------- eval, loop
    sources = (train_source, eval_source)
    evaluate = Evaluator(config, workdir, module, tok, sources, state_sh["params"], mesh)
    loop = common.bookkeeping(
      run,
      flops_per_step=model_cfg.train_flops_per_token(config.max_len) * config.batch_size,
      dtype=model_cfg.dtype,
      metric_keys=("loss", "eval/loss", "lr"),
    )
    common.evaluate_start(run, lambda: evaluate(state["params"], 0))
    step = run.start_step
    while step < config.total_steps:
      local = _model_inputs(next(train_loader))
      with sharding.use_mesh(mesh, rules):
        state, step_metrics = update_fn(state, sharding.host_to_global(local, mesh))
      step += 1
      preempted = run.ckpt.preemption_requested(step)
      tokens = float(local["input_mask"].sum()) * jax.process_count()
      loop.after_update(
        step, step_metrics, tokens, lambda: evaluate(state["params"], step), preempted=preempted
      )
      common.save_if_due(run, loop, step, state, clock)
      if preempted:
        logging.warning("SIGTERM: saved step %d and stopping; rerun to resume.", step)
        break
  if step >= config.total_steps and stages.needs_export(workdir, step):
    # The loop's last eval (recomputed if the run stopped after its final checkpoint).
    loop.final_eval(run.start_step, lambda: evaluate(state["params"], step))
    # The stage is done: later stages load this export (see rlhf_jax/stages.py).
    meta = {
      "kind": "policy",
      "model": lora.plain(model_cfg).to_dict(),  # adapters are merged into the export
      "tokenizer": tok.filename,
      "step": step,
      "data_content_hash": data_info["content_hash"],
      "eval": loop.last_eval,
    }
    stages.export(workdir, lora.merged(state["params"], model_cfg), meta)
  logging.info("Done at step %d: %s", step, loop.last_eval)
  return loop.last_eval


# --------------------------------------------------------------- helpers

MODEL_INPUTS = ("tokens", "input_mask", "loss_mask")


def _input_keys(packed: bool) -> tuple[str, ...]:
  return (*MODEL_INPUTS, "segment_ids") if packed else MODEL_INPUTS


def _model_inputs(batch):
  return {k: batch[k] for k in _input_keys("segment_ids" in batch)}


def tokenizer_texts(source):
  """The texts a tokenizer trained on this data sees.

  A prompt/response record gives its prompt and its response; a chat record its whole
  rendered conversation (`chat.render_chat`), role prefixes included, as the model reads it.
  """
  for i in range(len(source)):
    record = source[i]
    if record.get("messages"):
      yield chat.render_chat(record["messages"])
    else:
      yield record["prompt"]
      yield record["response"]


def make_train_loader(config, train_source, tok):
  """The training loader, over examples or (with config.data.packing) over packs of them.

  Packs are made once, here, from the rows' lengths (`lengths.keep_fitting` measured them)
  and config.seed, so a resumed run rebuilds the same packs and the loader's saved
  position among them resumes exactly. Returns (loader, packing stats or None).
  """
  data = config.data
  if not data.packing:
    common.check_batch_fits(len(train_source), config.batch_size, "training examples")
    collate = functools.partial(
      loader_lib.sft_collate, tokenizer=tok, max_len=config.max_len, train_on=data.train_on
    )
    loader = loader_lib.Loader(
      train_source, global_batch_size=config.batch_size, seed=config.seed, collate=collate
    )
    return loader, None
  packs = packing.pack(train_source.row_lengths, config.max_len, config.seed)
  stats = packing.pack_stats(train_source.row_lengths, packs, config.max_len)
  common.check_batch_fits(len(packs), config.batch_size, "packed training rows")
  collate = functools.partial(
    packing.pack_collate, tokenizer=tok, max_len=config.max_len, train_on=data.train_on
  )
  loader = loader_lib.Loader(
    packing.PackedSource(train_source, packs),
    global_batch_size=config.batch_size,
    seed=config.seed,
    collate=collate,
  )
  return loader, stats


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _batch_divisor(mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def _pad_rows(batch, rows, pad_id):
  """Pads a (final, partial) eval batch with empty rows; their masks are False."""
  b = batch["tokens"].shape[0]
  if b == rows:
    return batch
  out = {}
  for k, v in batch.items():
    fill = pad_id if k == "tokens" else 0
    out[k] = np.concatenate([v, np.full((rows - b, *v.shape[1:]), fill, v.dtype)])
  return out


def _pad_prompt_rows(tokens, mask, rows, tok):
  b = tokens.shape[0]
  if b == rows:
    return tokens, mask
  # Filler rows hold a single BOS so no attention row is empty; they are dropped.
  extra_t = np.full((rows - b, tokens.shape[1]), tok.pad_id, tokens.dtype)
  extra_m = np.zeros((rows - b, tokens.shape[1]), bool)
  extra_t[:, -1] = max(tok.bos_id, 0)
  extra_m[:, -1] = True
  return np.concatenate([tokens, extra_t]), np.concatenate([mask, extra_m])
