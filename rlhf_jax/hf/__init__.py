"""Hugging Face models in and out: `hf:DIR` as a starting stage, and export to HF format.

A stage field that takes a finished stage (`policy_init`) also takes `hf:DIR`, a Hugging
Face model directory (`config.json`, `model.safetensors` or shards with an index,
`tokenizer.json` and `tokenizer_config.json`), for the architectures of `hf.config`. The
model is read tensor by tensor into its sharding (`hf.weights`), its tokenizer through
the `tokenizers` library (`hf.tokenizer`). `experiments/export.py --format=hf` writes a
finished policy back as a directory `transformers` loads with `AutoModelForCausalLM`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax

from rlhf_jax import errors, models, sharding
from rlhf_jax.hf import config as hf_config
from rlhf_jax.hf import weights
from rlhf_jax.hf.tokenizer import HfTokenizer

PREFIX = "hf:"


def is_hf(path: Any) -> bool:
  return isinstance(path, str) and path.startswith(PREFIX)


def directory_of(path: str) -> str:
  return path[len(PREFIX) :] if is_hf(path) else path


def check(path: str, kind: str = "policy") -> str | None:
  """Why `hf:DIR` cannot serve as a `kind` stage ("policy": a causal LM, "reward": a
  one-label sequence classifier, "any": either), for config validation; None when it can."""
  directory = directory_of(path)
  if not os.path.isdir(directory):
    return "no such directory"
  config_path = os.path.join(directory, "config.json")
  try:
    hf = hf_config.read(directory)
    hf_config.to_model_config(hf, config_path)
    classifier = hf_config.is_classifier(hf, config_path)
  except errors.Error as error:
    return str(error)
  if kind != "any" and classifier != (kind == "reward"):
    what = "a sequence classifier" if classifier else "a causal language model"
    need = (
      "a reward model (one-label ...ForSequenceClassification)"
      if kind == "reward"
      else "a policy (...ForCausalLM)"
    )
    return f"holds {what} ({hf.get('architectures')}), not {need}"
  if not os.path.exists(os.path.join(directory, "tokenizer.json")):
    return f"{directory} has no tokenizer.json"
  return None


def is_classifier(path: str) -> bool:
  """Whether `hf:DIR` (or DIR) holds a one-label sequence classifier (else a causal LM)."""
  directory = directory_of(path)
  return hf_config.is_classifier(hf_config.read(directory), os.path.join(directory, "config.json"))


def tokenizer_mismatch(path: str, tok) -> str | None:
  """Why the model in `hf:DIR` cannot read the ids `tok` writes, or None when it can: its
  `tokenizer.json` must be the same file as `tok`'s, and its embedding table must have a
  row for every id `tok` uses (PAD included)."""
  directory = directory_of(path)
  if not isinstance(tok, HfTokenizer):
    return "its tokenizer is not the policy's (a SentencePiece vocabulary trained here)"
  mine, theirs = (os.path.join(d, "tokenizer.json") for d in (tok.directory, directory))
  with open(mine, "rb") as a, open(theirs, "rb") as b:
    if a.read() != b.read():
      return f"its tokenizer.json differs from the policy's ({mine})"
  vocab = hf_config.to_model_config(hf_config.read(directory)).vocab_size
  largest = max(tok.vocab_size - 1, tok.pad_id, tok.eos_id, tok.bos_id)
  if largest >= vocab:
    return f"its embedding table has {vocab} rows, but the policy's tokenizer uses id {largest}"
  return None


# ModelConfig fields a run may choose for an imported model: how it computes and stores,
# not what it computes.
COMPUTE_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "attention_impl")


def load_policy(path: str, mesh, rules: str = "fsdp", **compute):
  """A `stages.Policy` from a Hugging Face model directory (`hf:DIR` or DIR); `compute`
  sets COMPUTE_FIELDS (e.g. param_dtype="bfloat16" keeps the parameters in bfloat16)."""
  from rlhf_jax import stages

  unknown = set(compute) - set(COMPUTE_FIELDS)
  if unknown:
    raise TypeError(f"load_policy sets only {COMPUTE_FIELDS}, not {sorted(unknown)}")
  directory = directory_of(path)
  hf = hf_config.read(directory)
  cfg = hf_config.to_model_config(hf, os.path.join(directory, "config.json"), **compute)
  module = models.LanguageModel(cfg)
  boxed = jax.eval_shape(lambda: models.init_params(module, jax.random.key(0)))
  shapes = sharding.unbox(boxed)
  shardings = sharding.tree_shardings(shapes, sharding.logical_specs(boxed), mesh, rules)
  target = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )
  params = weights.load(directory, hf["model_type"], cfg, target)
  tok = HfTokenizer(directory, model_vocab_size=cfg.vocab_size)
  meta = {
    "kind": "policy",
    "model": cfg.to_dict(),
    "tokenizer": tok.filename,
    "hf_model_type": hf["model_type"],
    "source": PREFIX + os.path.abspath(directory),
  }
  return stages.Policy(module, params, shardings, tok, meta)


def fingerprint(path: str) -> bytes:
  """Bytes that change when the model directory's config or weights change: config.json
  and, per safetensors file, its name, size and modification time."""
  directory = directory_of(path)
  digest = hashlib.sha256(os.path.abspath(directory).encode())
  for name in sorted(os.listdir(directory)):
    full = os.path.join(directory, name)
    if name == "config.json":
      with open(full, "rb") as f:
        digest.update(f.read())
    elif name.endswith(".safetensors"):
      stat = os.stat(full)
      digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
  return digest.digest()


def export_policy(params, cfg: models.ModelConfig, tokenizer, out: str, *, dtype="float32"):
  """Writes a policy as a Hugging Face causal-LM directory (config, weights, tokenizer,
  generation config) that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
  kind = hf_config.architecture_of(cfg)
  os.makedirs(out, exist_ok=True)
  _copy_tokenizer(tokenizer, out)  # first: a tokenizer that does not convert writes no weights
  tensors = weights.hf_tensors(params, kind, cfg, dtype=dtype)
  weights.save(tensors, out)
  special = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
  if tokenizer.bos_id >= 0:
    special["bos_token_id"] = tokenizer.bos_id
  config = {**hf_config.from_model_config(cfg, kind), **special, "dtype": dtype}
  config["torch_dtype"] = dtype  # the transformers 4 spelling
  _write_json(os.path.join(out, "config.json"), config)
  _write_json(os.path.join(out, "generation_config.json"), special)
  return kind


def _write_json(path: str, data: dict[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(data, f, indent=2)


def load_reward_model(path: str, mesh, rules: str = "fsdp"):
  """A `stages.RewardModel` (an ensemble of one) from a Hugging Face one-label sequence
  classifier (`...ForSequenceClassification`, as TRL and OpenRLHF publish reward models).

  Its score is read at each row's last token, as the classifier's is; gain 1, and the
  offset an export from here recorded in config.json (else 0).
  """
  from rlhf_jax import stages

  directory = directory_of(path)
  config_path = os.path.join(directory, "config.json")
  hf = hf_config.read(directory)
  if not hf_config.is_classifier(hf, config_path):
    raise errors.StageError(
      f"{directory} is not a reward model: its config.json names {hf.get('architectures')}, "
      "not a one-label ...ForSequenceClassification."
    )
  cfg = hf_config.to_model_config(hf, config_path)
  module = models.ScalarModel(cfg, head_init="reward")
  boxed = jax.eval_shape(lambda: models.init_params(module, jax.random.key(0)))
  shapes = sharding.unbox(boxed)
  stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype), shapes)
  specs = jax.tree.map(
    lambda s: jax.P(None, *s), sharding.logical_specs(boxed), is_leaf=lambda x: isinstance(x, jax.P)
  )
  shardings = sharding.tree_shardings(stacked, specs, mesh, rules)
  member = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, jax.P(*tuple(s.spec)[1:]))
    ),
    shapes,
    shardings,
  )
  params = weights.load(directory, hf["model_type"], cfg, member, classifier=True)
  params = jax.jit(lambda p: jax.tree.map(lambda x: x[None], p), out_shardings=shardings)(params)
  tok = HfTokenizer(directory, model_vocab_size=cfg.vocab_size)
  offset = float(hf.get(hf_config.SCORE_OFFSET, 0.0))
  meta = {
    "kind": "reward",
    "model": cfg.to_dict(),
    "tokenizer": tok.filename,
    "ensemble_size": 1,
    "gain": 1.0,
    "bias": offset,
    "hf_model_type": hf["model_type"],
    "source": PREFIX + os.path.abspath(directory),
  }
  return stages.RewardModel(module, params, shardings, tok, 1.0, offset, meta)


def export_reward_model(rm, out: str, *, member: int = 0, dtype: str = "float32") -> str:
  """Writes member `member` of a reward model as a one-label sequence classifier that
  `transformers.AutoModelForSequenceClassification` loads. Its score is the normalised
  one up to a constant: score.weight is gain * the head's kernel; the constant (gain * head
  bias + bias, which the classifier cannot hold) goes to config.json's `SCORE_OFFSET`."""
  cfg = rm.module.config
  kind = hf_config.architecture_of(cfg)
  tok = rm.tokenizer
  one = jax.tree.map(lambda x: jax.device_get(x[member]), rm.params)
  head_bias = float(one["head"]["bias"])
  one["head"] = {"kernel": rm.gain * one["head"]["kernel"], "bias": 0.0}
  os.makedirs(out, exist_ok=True)
  _copy_tokenizer(tok, out)  # first: a tokenizer that does not convert writes no weights
  weights.save(weights.hf_tensors(one, kind, cfg, classifier=True, dtype=dtype), out)
  special = {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  if tok.bos_id >= 0:
    special["bos_token_id"] = tok.bos_id
  config = {
    **hf_config.from_model_config(cfg, kind, classifier=True),
    **special,
    "dtype": dtype,
    "torch_dtype": dtype,
    hf_config.SCORE_OFFSET: rm.gain * head_bias + rm.bias,
  }
  _write_json(os.path.join(out, "config.json"), config)
  return kind


def _copy_tokenizer(tok, out: str) -> None:
  """Writes the tokenizer files into `out`: a Hugging Face tokenizer's own, or a
  SentencePiece model (`data.tokenizer.Tokenizer`) converted by `hf.spm`."""
  if not isinstance(tok, HfTokenizer):
    from rlhf_jax.hf import spm

    spm.save(tok, out)
    return
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               "special_tokens_map.json"):  # fmt: skip
    source = os.path.join(tok.directory, name)
    if os.path.exists(source):
      with open(source, "rb") as src, open(os.path.join(out, name), "wb") as dst:
        dst.write(src.read())


def export_stage(workdir: str, out: str, dtype: str = "float32", member: int | None = None) -> str:
  """Writes the finished stage of `workdir` to `out` as a Hugging Face model (a policy as a
  causal LM, reward-model member `member` as a one-label classifier); returns its type.
  `experiments/export.py` is its command line."""
  from rlhf_jax import stages

  meta = stages.read_meta(workdir)  # a StageError names what is missing
  mesh = sharding.make_mesh((1, -1, 1))
  if meta.get("kind") == "policy":
    policy = stages.load_policy(workdir, mesh)
    cfg = policy.module.config
    return export_policy(policy.params, cfg, policy.tokenizer, out, dtype=dtype)
  size = int(meta.get("ensemble_size", 1))
  if member is None and size > 1:
    raise errors.StageError(
      f"{workdir} is an ensemble of {size} reward models; a classifier holds one.",
      hint=f"Choose one with --member=K (0 to {size - 1}).",
    )
  if member is not None and not 0 <= member < size:
    raise errors.StageError(f"--member={member} is outside 0..{size - 1} ({workdir}).")
  rm = stages.load_reward_model(workdir, mesh)
  return export_reward_model(rm, out, member=member or 0, dtype=dtype)
