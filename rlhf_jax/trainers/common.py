"""Pieces every trainer shares: model config from a config section, train state, data,
and the run around the train loop (`Run`: checkpointer, metric writer, restore or init,
the log/eval/save schedule).

Kept small on purpose: a trainer's loop stays in its own file, top to bottom; these
helpers only remove code that would otherwise be copied verbatim.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rlhf_jax import checkpoint, distributed, errors, metrics, models, sharding
from rlhf_jax import config_spec as cs
from rlhf_jax.data import loader as loader_lib
from rlhf_jax.data import prompts as prompts_lib
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.utils import write_json_atomic  # noqa: F401 (trainers use common.write_json_atomic)

# The `tokenizer` section of a stage that trains its own vocabulary (SFT).
TOKENIZER_SPEC = cs.Spec(
  {
    "path": cs.Path("file"),
    "vocab_size": cs.Int(min=8),
    "model_type": cs.Choice("unigram", "bpe"),
  }
)


def close_all(*closers: Callable[[], Any]) -> None:
  """Calls every closer (waits for saves, closes files), even when one fails.

  Called in a `finally`: while an exception propagates, a closer's own failure (Orbax
  failing to finish a save after a NaN stop, say) is logged, not raised, so the user
  sees the first error rather than a misleading second one.
  """
  propagating = sys.exc_info()[1] is not None
  first: Exception | None = None
  for close in closers:
    try:
      close()
    except Exception as error:
      if propagating:
        logging.warning("Stopping after an error, %s failed too: %s", close.__qualname__, error)
      elif first is None:
        first = error
  if first is not None:
    raise first


def check_batch_fits(num_records: int, batch_size: int, what: str, key="config.batch_size"):
  """A training set must fill at least one batch (the loader drops partial batches)."""
  if num_records < batch_size:
    raise errors.ConfigError(
      f"{key}={batch_size} exceeds the {num_records} {what} (after leaving out those that do "
      "not fit): a training batch would never fill.",
      hint=f"Lower {key} or give more data.",
    )


def model_config(section: Any, vocab_size: int) -> models.ModelConfig:
  """A ModelConfig from `config.model`: `preset` plus any ModelConfig fields."""
  fields = dict(section)
  preset = fields.pop("preset")
  fields["vocab_size"] = vocab_size
  return models.get_model_config(preset, **fields)


def get_tokenizer(config: Any, workdir: str, texts_fn) -> tokenizer_lib.Tokenizer:
  """Loads `config.tokenizer.path`, or the workdir's, or trains one on `texts_fn()`.

  A tokenizer trained here is saved as `<workdir>/tokenizer.model`, so a
  resumed run and every later stage use the same vocabulary.
  """
  local = os.path.join(workdir, "tokenizer.model")
  path = config.tokenizer.path or local
  if os.path.exists(path):
    tok = _load_tokenizer(path, "config.tokenizer.path" if config.tokenizer.path else None)
    if path != local and jax.process_index() == 0:
      tok.save(local)  # the workdir always holds the vocabulary its stage used
    return tok
  if config.tokenizer.path:
    raise errors.ConfigError(f"config.tokenizer.path={config.tokenizer.path!r}: no such file.")

  def train():
    logging.info("Training a SentencePiece tokenizer (vocab %d)", config.tokenizer.vocab_size)
    tok = tokenizer_lib.Tokenizer.train(
      texts_fn(), config.tokenizer.vocab_size, model_type=config.tokenizer.model_type
    )
    tok.save(path)
    return tok

  # Process 0 trains and saves it; the others load that file (one vocabulary for all).
  return distributed.primary_first("tokenizer", train, others=lambda: _load_tokenizer(path))


def _load_tokenizer(path: str, key: str | None = None) -> tokenizer_lib.Tokenizer:
  """Tokenizer.load, with a damaged file as an error naming it (and the config key)."""
  try:
    return tokenizer_lib.Tokenizer.load(path)
  except (OSError, RuntimeError, ValueError) as error:
    hint = (
      f"Point {key} at a SentencePiece .model file."
      if key
      else f"Delete {path} to train it again (the same data gives the same vocabulary), or "
      "restore it."
    )
    raise errors.DataError(
      path, 0, f"not a readable SentencePiece model ({error})", hint=hint
    ) from None


def state_shardings(abstract_state: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, abstract_state)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract` carrying `shardings`: a restore target for Orbax."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def replicated(mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.P())


def tree_size(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def to_host(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
  """Fetches a dict of device scalars in one transfer."""
  host = jax.device_get(dict(metrics))
  return {k: np.asarray(v).item() for k, v in host.items()}


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# Tokenized, left-padded prompts [B, length] (BOS first), keeping each prompt's end.
left_pad_prompts = prompts_lib.left_pad


def checkpointer(config: Any, workdir: str) -> checkpoint.Checkpointer:
  """The stage's `<workdir>/checkpoints` with the config's keep and save intervals."""
  return checkpoint.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=config.keep_checkpoints,
    save_interval_steps=config.checkpoint_every,
  )


def mesh_from_config(config: Any):
  return sharding.make_mesh(tuple(config.mesh))


def mirror_shardings(opt_abstract: Any, params_abstract: Any, param_shardings: Any, mesh) -> Any:
  """Shardings for optimizer state: a leaf that mirrors a parameter takes its sharding.

  Adam moments (and gradient-accumulation buffers) repeat the parameter tree
  inside optax's state tuples, so a leaf whose path ends with a parameter's
  path and has its shape lives where that parameter lives; counts and other
  scalars are replicated.
  """
  params = sharding.unbox(params_abstract)
  by_path = {
    jax.tree_util.keystr(path): (tuple(leaf.shape), sh)
    for (path, leaf), sh in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings), strict=True
    )
  }
  rep = replicated(mesh)

  def one(path, leaf):
    key = jax.tree_util.keystr(path)
    for param_path, (shape, sh) in by_path.items():
      if key.endswith(param_path) and tuple(leaf.shape) == shape:
        return sh
    return rep

  return jax.tree_util.tree_map_with_path(one, opt_abstract)


class LoopBookkeeping:
  """What every train loop does after an update: timing, MFU, health checks, logs, evals.

  Per step, `after_update` decides whether this step logs, evaluates or saves
  (every `log_every` / `eval_every` / `checkpoint_every` steps and at the last
  step), fetches the step's metrics only then (one device-to-host transfer),
  checks them for NaN/Inf *before* any save so a bad state is never written,
  and writes one metrics line. `should_save` then tells the loop to save.
  """

  def __init__(self, config, *, writer, progress, mesh, flops_per_step: float, dtype: str):
    self.config = config
    self.writer = writer
    self.progress = progress
    self.mesh = mesh
    self.flops_per_step = flops_per_step
    self.peak, _ = metrics.peak_flops_per_device(jax.devices()[0], dtype)
    self.last_eval: dict[str, float] = {}
    self.should_save = False
    self._reset_timer()

  def _reset_timer(self) -> None:
    self._start, self._steps, self._tokens = time.perf_counter(), 0, 0.0

  def after_update(
    self,
    step: int,
    step_metrics: Any,
    tokens: float,
    evaluate: Callable[[], dict[str, float]],
    *,
    preempted: bool = False,
  ) -> None:
    """Bookkeeping for `step` (1-based, after its update); `tokens` counted over all hosts."""
    cfg = self.config
    self._steps += 1
    self._tokens += tokens
    last = step == cfg.total_steps
    is_log = step % cfg.log_every == 0 or last
    is_eval = step % cfg.eval_every == 0 or last
    self.should_save = step % cfg.checkpoint_every == 0 or last or preempted
    if not (is_log or is_eval or self.should_save):
      return
    host = to_host(step_metrics)
    metrics.check_finite(step, host)
    line: dict[str, float] = {}
    if is_log:
      elapsed = time.perf_counter() - self._start
      host["steps_per_s"] = self._steps / elapsed
      host["tokens_per_s"] = self._tokens / elapsed
      if np.isfinite(self.peak):
        host["mfu"] = metrics.mfu(
          self.flops_per_step, elapsed / self._steps, self.mesh.size, self.peak
        )
      line = host
      self._reset_timer()
    if is_eval:
      self.last_eval = evaluate()
      metrics.check_finite(step, self.last_eval, context="eval")
      line = {**line, **self.last_eval}
    if line:
      self.writer.write(step, line)
      self.progress.log(step, line)

  def final_eval(
    self, start_step: int, evaluate: Callable[[], dict[str, float]]
  ) -> dict[str, float]:
    """The final state's eval metrics, for the stage's export; sets and returns `last_eval`.

    After the loop's last step that is the eval `after_update` took. A run stopped
    after its final checkpoint but before its export restores at `total_steps` and
    skips the loop, so nothing is in memory: then `evaluate()` is run on the
    restored final state, which gives the figures an uninterrupted run exported
    (nothing is written to the metrics, which already hold that step's line).
    Call it only when the export is still to be written.
    """
    if start_step >= self.config.total_steps:
      self.last_eval = evaluate()
      metrics.check_finite(start_step, self.last_eval, context="eval")
    return self.last_eval


# ----------------------------------------------------------------- the run
# What every trainer does around its own jitted programs: `open_run` once its data is
# ready (then `with run:` around the rest, which closes it however the run ends),
# `restore_or_init` once the state's shape is known, `bookkeeping` and `evaluate_start`
# before the loop, `save_if_due` inside it.


class StageClock:
  """Wall time of this stage across resumes: kept in checkpoint metadata by the trainer.

  Counts `previous` (the seconds earlier runs of the stage took, from the checkpoint)
  plus the time since `start` (a `time.perf_counter()` value; default now), so a
  trainer that starts the clock after its setup still counts the setup.
  """

  def __init__(self, previous: float = 0.0, start: float | None = None):
    self.previous = previous
    self._start = time.perf_counter() if start is None else start

  def elapsed(self) -> float:
    return self.previous + time.perf_counter() - self._start


@dataclasses.dataclass
class Run:
  """A stage's run: its mesh, checkpointer (and the step it resumes from), metric writer,
  the training loader whose position each checkpoint records, and when its clock started."""

  config: Any
  workdir: str
  mesh: Any
  rules: Any
  loader: loader_lib.Loader
  ckpt: checkpoint.Checkpointer
  start_step: int
  writer: metrics.MetricWriter
  clock_start: float
  # A fresh stage continued from another stage's last checkpoint (`config.continue_from`):
  # that stage's workdir and checkpointer; the state is restored from it at `start_step`.
  continued_from: str = dataclasses.field(default="", kw_only=True)
  source_ckpt: checkpoint.Checkpointer | None = dataclasses.field(default=None, kw_only=True)

  @property
  def is_primary(self) -> bool:
    return jax.process_index() == 0

  def __enter__(self) -> Run:
    return self

  def __exit__(self, *exc_info) -> None:
    # Also on an error: the first error is the one that propagates (`close_all`).
    source = self.source_ckpt.close if self.source_ckpt is not None else lambda: None
    close_all(source, self.ckpt.wait, self.ckpt.close, self.writer.close)


def make_exporter(config, workdir: str):
  """The stage's metric exporters (`config.exporters`, rlhf_jax/exporters), or None."""
  from rlhf_jax import exporters

  section = config.get("exporters")
  if section is None:
    return None
  exporter = exporters.make(section, workdir=workdir, stage=str(config.trainer), run_config=config)
  return exporter or None


def open_run(config, workdir: str, mesh, loader, *, clock_start: float, cls=Run, **fields):
  """Opens the checkpointer and the metric writer of a stage whose data is ready.

  Called after everything that can fail on the user's data, so such an error leaves no
  checkpointer thread behind. A fresh start (no intact checkpoint) drops any metrics
  lines a run killed before its first checkpoint left. `cls`/`fields`: a subclass of
  `Run` and its extra fields.
  """
  source, source_ckpt, source_step = config.get("continue_from") or "", None, 0
  ckpt = checkpointer(config, workdir)
  own_step = ckpt.latest_intact_step() or 0
  if source and not own_step:
    source_ckpt, source_step = open_source(config, source)
  writer = metrics.MetricWriter(
    workdir, resume_step=own_step or -1, exporter=make_exporter(config, workdir)
  )
  return cls(
    config=config, workdir=workdir, mesh=mesh, rules=config.sharding_rules, loader=loader,
    ckpt=ckpt, start_step=own_step or source_step, writer=writer, clock_start=clock_start,
    continued_from=source if source_ckpt else "", source_ckpt=source_ckpt, **fields,
  )  # fmt: skip


def open_source(config, source: str) -> tuple[checkpoint.Checkpointer, int]:
  """(checkpointer, step) of the newest intact checkpoint of `config.continue_from`.

  Raises:
    ConfigError: naming config.continue_from when that stage holds no checkpoint, or
      already reached this stage's total_steps.
  """
  key = f"config.continue_from={source!r}"
  directory = os.path.join(source, "checkpoints")
  if not os.path.isdir(directory):
    raise errors.ConfigError(f"{key} holds no checkpoints/ folder to continue from.")
  source_ckpt = checkpoint.Checkpointer(directory, max_to_keep=None, async_save=False)
  try:
    step = source_ckpt.latest_intact_step()
    if not step:
      raise errors.ConfigError(f"{key} holds no intact checkpoint to continue from.")
    if step >= config.total_steps:
      raise errors.ConfigError(
        f"{key} ended at step {step}; config.total_steps={config.total_steps} must be "
        "larger (it counts the steps of that stage too)."
      )
  except BaseException:
    source_ckpt.close()
    raise
  return source_ckpt, step


def restore_or_init(run: Run, abstract_state, init: Callable[[], Any]):
  """(state, StageClock): the latest intact checkpoint (and the loader's position and the
  time spent so far), or `init()` on a fresh start; SIGTERM then saves and stops."""
  previous = 0.0
  with sharding.use_mesh(run.mesh, run.rules):
    if run.source_ckpt is not None:
      # A stage of its own from another's state: its time and metrics start here.
      key = f"config.continue_from={run.continued_from!r}"
      try:
        state, meta = run.source_ckpt.restore(run.start_step, target=abstract_state)
      except errors.CheckpointError as error:
        raise errors.ConfigError(
          f"{key}: its state does not fit this stage's (another trainer, model or "
          f"optimizer?): {error}"
        ) from None
      finally:
        run.source_ckpt.close()
      run.source_ckpt = None
      run.loader.set_state(meta["loader"])
      logging.info("Continuing %s from its step %d", run.continued_from, run.start_step)
    elif run.start_step:
      state, meta = run.ckpt.restore(run.start_step, target=abstract_state)
      run.loader.set_state(meta["loader"])
      previous = float(meta.get("wall_time_s", 0.0))
      logging.info("Resumed from step %d (%s)", run.start_step, run.ckpt.directory)
    else:
      state = init()
  run.ckpt.install_sigterm_handler()
  return state, StageClock(previous, start=run.clock_start)


def bookkeeping(
  run: Run, *, flops_per_step: float, dtype: str, metric_keys: tuple[str, ...]
) -> LoopBookkeeping:
  """The loop's logging, eval and save schedule (`LoopBookkeeping`) with progress lines."""
  progress = metrics.ProgressLogger(
    run.config.total_steps,
    every_n_steps=run.config.log_every,
    start_step=run.start_step,
    metric_keys=metric_keys,
  )
  return LoopBookkeeping(
    run.config,
    writer=run.writer,
    progress=progress,
    mesh=run.mesh,
    flops_per_step=flops_per_step,
    dtype=dtype,
  )


def evaluate_start(run: Run, evaluate: Callable[[], dict[str, float]]) -> None:
  """The first eval line (the starting model, at `run.start_step`: 0, or the step a
  continued stage starts from) of a fresh run; a resumed run has it. `evaluate()` must
  evaluate at `run.start_step`."""
  if run.start_step == 0 or run.continued_from:
    first = evaluate()
    metrics.check_finite(run.start_step, first, context="eval")
    run.writer.write(run.start_step, first)


def save_if_due(run: Run, loop: LoopBookkeeping, step: int, state, clock: StageClock) -> None:
  """The checkpoint the loop's schedule asks for: state, loader position, time so far."""
  if loop.should_save:
    meta = {"loader": run.loader.get_state(), "wall_time_s": clock.elapsed()}
    run.ckpt.save(step, state, meta, force=True)


def add_lora(module, params, section, key, mesh, rules):
  """(module, params, shardings) of a loaded model with fresh LoRA adapters (a `lora`
  config section with rank > 0; `models.lora`): the module's config gains the adapters,
  the parameters gain them next to the weights they adapt (B = 0, so the model computes
  what it did), sharded by their logical axes. Other parameters are the same arrays."""
  from rlhf_jax.models import lora

  module = module.clone(config=lora.with_adapters(module.config, section))
  boxed = jax.eval_shape(lambda: models.init_params(module, key))
  shapes = sharding.unbox(boxed)
  shardings = sharding.tree_shardings(shapes, sharding.logical_specs(boxed), mesh, rules)
  fresh = jax.jit(
    lambda k: lora.adapters(sharding.unbox(models.init_params(module, k))),
    out_shardings=lora.adapters(shardings),
  )(key)
  return module, lora.attach(params, fresh), shardings
