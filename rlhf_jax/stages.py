"""Finished stages: what a trainer exports and how a later stage loads it.

A stage that completes writes

    <workdir>/export/0/         Orbax checkpoint of the network's parameters
    <workdir>/export.json       kind, ModelConfig, tokenizer file, extras (written last)
    <workdir>/tokenizer.model   the vocabulary the network was trained with (or tokenizer/,
                                the files of a Hugging Face tokenizer: `load_tokenizer`)

`export.json` is written after the parameters are committed, so its presence
means the stage is complete: a pipeline reuses such a stage instead of
training it again. Loading goes through `checkpoint.Checkpointer`, so a
checkpoint of the wrong shape fails with the parameter path named, and the
parameters land directly in the requested sharding.

A finished stage rerun with a larger `total_steps` trains on from its last
checkpoint. From then on its export is stale: `is_complete` is False while the
stage's newest checkpoint (`<workdir>/checkpoints/`) is past the export's
"step", loading it raises a StageError, and the trainer re-exports when it
finishes (`needs_export`), so a later stage never silently loads the old policy.

Kinds: "policy" (LanguageModel params) and "reward" (ScalarModel params
stacked over an ensemble axis, with a normalisation gain and bias).

`load_policy` and `load_reward_model` also take `hf:DIR`, a Hugging Face model directory
(a causal LM, or a one-label sequence classifier as the reward model; `rlhf_jax.hf`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint, distributed, errors, models, sharding, utils
from rlhf_jax.data.tokenizer import Tokenizer, pad_batch
from rlhf_jax.rl.reward import last_token_scores

EXPORT_DIR = "export"
EXPORT_META = "export.json"
CHECKPOINT_DIR = "checkpoints"  # the trainers' `Checkpointer` folder


def is_complete(workdir: str) -> bool:
  """True when `workdir` holds a readable export that is not behind the stage's checkpoints."""
  try:
    meta = read_meta(workdir)
  except errors.StageError:
    return False
  return _checkpoint_past_export(workdir, meta) is None


def needs_export(workdir: str, step: int) -> bool:
  """Whether a run that ended at `step` must (re)write the export.

  True when there is none, when export.json is unreadable, or when it is of another step (the
  stage was rerun with another `total_steps`).
  """
  try:
    meta = read_meta(workdir)
  except errors.StageError:
    return True
  return meta.get("step") != step


def export(workdir: str, params: Any, meta: dict[str, Any]) -> None:
  """Saves `params` and `meta` as the stage's export (synchronously), replacing an older one.

  The order keeps a kill at any point safe: export.json, the completion marker, goes first,
  then the old parameters; the new ones are committed, and export.json is written last. In
  between the stage reads as unfinished, and a rerun exports again from its final checkpoint.
  """
  marker = os.path.join(workdir, EXPORT_META)
  export_dir = os.path.join(workdir, EXPORT_DIR)
  if jax.process_index() == 0:
    if os.path.exists(marker):
      os.remove(marker)
    # Checkpointer.save never overwrites a step, and a stale step 0 is what is being replaced.
    if os.path.exists(export_dir):
      shutil.rmtree(export_dir)
  distributed.barrier("stage-export-cleared")
  with checkpoint.Checkpointer(
    export_dir, max_to_keep=1, save_interval_steps=1, async_save=False
  ) as ckpt:
    ckpt.save(0, params, meta, force=True)
    ckpt.wait()
  if jax.process_index() == 0:
    utils.write_json_atomic(marker, meta)


def read_meta(workdir: str) -> dict[str, Any]:
  """The stage's export.json.

  Raises:
    StageError: it is missing (the stage is not finished) or unreadable.
  """
  path = os.path.join(workdir, EXPORT_META)
  try:
    with open(path) as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise errors.StageError(
      f"{workdir} holds no finished stage ({EXPORT_META} is missing)",
      hint="Train it first, or point the config at a finished stage's workdir.",
    ) from None
  except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
    raise errors.StageError(
      f"{path} is unreadable ({error})", hint="Rerun that stage to export it again."
    ) from None
  if not isinstance(meta, dict):
    raise errors.StageError(
      f"{path} is not a JSON object", hint="Rerun that stage to export it again."
    )
  return meta


def _checkpoint_past_export(workdir: str, meta: dict[str, Any]) -> int | None:
  """The stage's newest checkpoint step when it is past the export's step, else None."""
  steps = checkpoint.committed_steps(os.path.join(workdir, CHECKPOINT_DIR))
  exported = meta.get("step")
  if not steps or not isinstance(exported, int) or steps[-1] <= exported:
    return None
  return steps[-1]


def _read_current_meta(workdir: str) -> dict[str, Any]:
  """`read_meta`, refusing an export the stage has trained past since."""
  meta = read_meta(workdir)
  latest = _checkpoint_past_export(workdir, meta)
  if latest is not None:
    raise errors.StageError(
      f"{workdir} was trained past its export: the export is of step {meta['step']}, its "
      f"newest checkpoint of step {latest}",
      hint="Rerun that stage to finish it: it resumes from that checkpoint and exports again.",
    )
  return meta


def _restore(workdir, abstract_boxed, mesh, rules, *, stack: int = 0):
  """Restores the export into shardings derived from the logical axes of `abstract_boxed`."""
  shapes = sharding.unbox(abstract_boxed)
  specs = sharding.logical_specs(abstract_boxed)
  if stack:
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((stack, *x.shape), x.dtype), shapes)
    specs = jax.tree.map(
      lambda s: jax.P(None, *s), specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
  shardings = sharding.tree_shardings(shapes, specs, mesh, rules)
  target = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )
  with checkpoint.Checkpointer(os.path.join(workdir, EXPORT_DIR), async_save=False) as ckpt:
    params, _ = ckpt.restore(0, target=target)
  return params, shardings


@dataclasses.dataclass
class Policy:
  """A trained language model: `module.apply({"params": params}, ...)`."""

  module: models.LanguageModel
  params: Any
  shardings: Any
  tokenizer: Tokenizer
  meta: dict[str, Any]
  # Compiled samplers, keyed by their settings: one compile per setting, not per call.
  samplers: dict[Any, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def sampler(self, *, max_new_tokens: int, temperature: float, mesh, rules):
    """The jitted, sharded KV-cache sampler for these settings, compiled once and kept.

    f(params, prompt [B, P] left-padded, mask [B, P], rng) -> rl.sampler.SampleOutput;
    params must have this policy's shardings (its own params, or a trained copy).
    """
    from rlhf_jax.rl import sampler as sampler_lib  # the sampler needs the models only

    config = sampler_lib.SamplerConfig(
      max_new_tokens=max_new_tokens,
      eos_id=self.tokenizer.eos_id,
      pad_id=self.tokenizer.pad_id,
      temperature=temperature,
      num_valid=self.tokenizer.vocab_size,
    )
    key = (config, mesh, str(rules))
    if key not in self.samplers:
      self.samplers[key] = sampler_lib.make_sampler(
        self.module, config, mesh=mesh, rules=rules, param_shardings=self.shardings
      )
    return self.samplers[key]

  def generator(self, **settings):
    """f(prompts, rng) -> texts: `generate` with these settings (max_new_tokens,
    temperature, prompt_len, batch_size, mesh, rules) fixed."""
    return lambda prompts, rng: self.generate(prompts, rng=rng, **settings)

  def generate(
    self,
    prompts,
    *,
    rng,
    max_new_tokens: int,
    temperature: float,
    prompt_len: int,
    batch_size: int,
    mesh,
    rules,
    params=None,
  ) -> list[str]:
    """One sampled response (text) per prompt, in batches of `batch_size` (jitted, sharded).

    Prompts are left-padded to `prompt_len` tokens keeping their end; the last batch is
    padded with copies of its first prompt, so one compiled shape serves every batch.
    Batch b uses the key fold_in(rng, b * batch_size). `params` default to the policy's.
    """
    from rlhf_jax.data import prompts as prompts_lib

    fn = self.sampler(
      max_new_tokens=max_new_tokens, temperature=temperature, mesh=mesh, rules=rules
    )
    params = self.params if params is None else params
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
      chunk = list(prompts[start : start + batch_size])
      padded = chunk + [chunk[0]] * (batch_size - len(chunk))
      tokens, mask = prompts_lib.left_pad(self.tokenizer, padded, prompt_len)
      with sharding.use_mesh(mesh, rules):
        result = fn(
          params,
          sharding.global_from_full(tokens, mesh),
          sharding.global_from_full(mask, mesh),
          jax.random.fold_in(rng, start),
        )
      out.extend(self.tokenizer.decode_batch(sharding.fetch(result.tokens)[: len(chunk)]))
    return out


def load_tokenizer(workdir: str, meta: dict[str, Any]):
  """The stage's tokenizer: a SentencePiece `.model` file, or a Hugging Face tokenizer
  directory (`rlhf_jax.hf.tokenizer`) for a model that came from `hf:DIR`."""
  path = os.path.join(workdir, meta["tokenizer"])
  if os.path.isdir(path):
    from rlhf_jax.hf.tokenizer import HfTokenizer

    return HfTokenizer(path, model_vocab_size=meta["model"]["vocab_size"])
  return Tokenizer.load(path)


def load_policy(workdir: str, mesh, rules: str = "fsdp", **hf_compute) -> Policy:
  """The policy a finished stage exported, or a Hugging Face model (`hf:DIR`, with
  `hf_compute` setting its dtypes, remat and layer scan: `hf.load_policy`)."""
  from rlhf_jax import hf

  if hf.is_hf(workdir):
    return hf.load_policy(workdir, mesh, rules, **hf_compute)
  meta = _read_current_meta(workdir)
  if meta.get("kind") != "policy":
    raise ValueError(f"{workdir} exports a {meta.get('kind')!r}, not a policy.")
  module = models.LanguageModel(models.ModelConfig(**meta["model"]))
  abstract = jax.eval_shape(lambda: models.init_params(module, jax.random.key(0)))
  params, shardings = _restore(workdir, abstract, mesh, rules)
  tok = load_tokenizer(workdir, meta)
  return Policy(module, params, shardings, tok, meta)


@dataclasses.dataclass
class RewardModel:
  """An ensemble of Bradley-Terry reward models with a shared normalisation.

  `score(tokens, mask)` returns the normalised ensemble-mean score read at the
  last real token of each right-padded row, and the ensemble's standard
  deviation (in normalised units), an uncertainty signal.
  """

  module: models.ScalarModel
  params: Any  # leaves stacked [E, ...]
  shardings: Any
  tokenizer: Tokenizer
  gain: float
  bias: float
  meta: dict[str, Any]

  def __post_init__(self):
    self._score = jax.jit(
      lambda params, tokens, mask: ensemble_scores(self.module, params, tokens, mask)
    )

  @property
  def ensemble_size(self) -> int:
    return int(jax.tree.leaves(self.params)[0].shape[0])

  def raw_scores(self, tokens, mask) -> jax.Array:
    """[E, B] unnormalised member scores."""
    return self._score(self.params, tokens, mask)

  def score(self, tokens, mask) -> tuple[jax.Array, jax.Array]:
    """(mean normalised score [B], ensemble std [B])."""
    raw = self.gain * self.raw_scores(tokens, mask) + self.bias
    return jnp.mean(raw, axis=0), jnp.std(raw, axis=0)

  def score_texts(
    self,
    prompts,
    responses,
    *,
    mesh,
    rules,
    max_len: int,
    batch_size: int = 64,
    members: bool = False,
  ) -> np.ndarray:
    """Normalised ensemble-mean scores [N] (float64) of (prompt, response) texts; with
    `members`, every member's normalised score [E, N] instead.

    Rows are made with this model's own tokenizer as it was trained: BOS + prompt +
    response + EOS, right-padded to `max_len`; a longer row loses the start of its prompt
    (the score is read at the last token). Batches are padded to a multiple of the mesh's
    batch shards, so any number of texts works.
    """
    tok = self.tokenizer
    rows = []
    encoded = zip(tok.encode_batch(list(prompts)), tok.encode_batch(list(responses)), strict=True)
    head = [tok.bos_id] if tok.bos_id >= 0 else []
    for p_ids, r_ids in encoded:
      rows.append(head + [*p_ids, *r_ids, tok.eos_id][-(max_len - len(head)) :])
    shards = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
    batch_size = -(-batch_size // shards) * shards
    out = []
    for start in range(0, len(rows), batch_size):
      chunk = rows[start : start + batch_size]
      chunk = chunk + [chunk[0]] * (batch_size - len(chunk))
      tokens, mask = pad_batch(chunk, max_len, tok.pad_id, "right")
      tokens, mask = sharding.global_from_full(tokens, mesh), sharding.global_from_full(mask, mesh)
      with sharding.use_mesh(mesh, rules):
        if members:
          raw = np.asarray(sharding.fetch(self.raw_scores(tokens, mask)), np.float64)
          out.append((self.gain * raw + self.bias)[:, : len(rows) - start])
          continue
        mean, _ = self.score(tokens, mask)
      out.append(np.asarray(sharding.fetch(mean), np.float64)[: len(rows) - start])
    if members:
      return np.concatenate(out, axis=1) if out else np.zeros((self.ensemble_size, 0))
    return np.concatenate(out) if out else np.zeros(0)


def ensemble_scores(module, params, tokens, mask, dropout_key=None) -> jax.Array:
  """[E, B] scores of every ensemble member, read at each row's last real token.

  Args:
    module: a ScalarModel.
    params: its parameters stacked on a leading ensemble axis [E, ...].
    tokens: [B, T] int32, right-padded; mask: [B, T] bool.
    dropout_key: in training, the key of the model's dropout (LoRA adapters'; each member
      draws its own masks); None: no dropout.
  """
  positions = models.positions_from_mask(mask)
  attn = models.causal_attention_mask(mask)
  members = jax.tree.leaves(params)[0].shape[0]
  keys = jax.random.split(dropout_key, members) if dropout_key is not None else None

  def one(p, key):
    rngs = {"dropout": key} if key is not None else None
    return last_token_scores(module.apply({"params": p}, tokens, positions, attn, rngs=rngs), mask)

  if keys is None:
    return jax.vmap(lambda p: one(p, None))(params)
  return jax.vmap(one)(params, keys)


def load_reward_model(workdir: str, mesh, rules: str = "fsdp") -> RewardModel:
  """The reward model a finished stage exported, or a Hugging Face one (`hf:DIR`)."""
  from rlhf_jax import hf

  if hf.is_hf(workdir):
    return hf.load_reward_model(workdir, mesh, rules)
  meta = _read_current_meta(workdir)
  if meta.get("kind") != "reward":
    raise ValueError(f"{workdir} exports a {meta.get('kind')!r}, not a reward model.")
  module = models.ScalarModel(models.ModelConfig(**meta["model"]), head_init="reward")
  abstract = jax.eval_shape(lambda: models.init_params(module, jax.random.key(0)))
  params, shardings = _restore(workdir, abstract, mesh, rules, stack=meta["ensemble_size"])
  tok = load_tokenizer(workdir, meta)
  return RewardModel(module, params, shardings, tok, float(meta["gain"]), float(meta["bias"]), meta)


def as_numpy(x) -> np.ndarray:
  return sharding.fetch(x)
