"""Hugging Face safetensors <-> this framework's parameter trees.

Two tables per architecture say how each tensor maps: `import_table` gives, for every
parameter of ours (a path in the tree; block parameters once, for layer `{i}`), the
Hugging Face tensor names it is made from and the function that makes it, and
`export_table` the reverse, for every Hugging Face tensor. Layouts differ in three ways:
torch's `Linear` stores [out, in] where ours are [in, out] (GPT-2's `Conv1D` already
stores [in, out]); attention projections are split per head here ([D, N, H], [N, H, D]);
GPT-2 fuses q, k and v into one `c_attn` tensor. The RoPE layout needs no permutation:
Hugging Face's Llama, Mistral, Qwen and Gemma and `models.apply_rope` both rotate half-split.
Gemma's norm weights are zero-centred (it scales by 1 + weight) and are kept as they are
(`ModelConfig.zero_centered_norm`), so a round trip is bit-exact.

Reading is tensor by tensor: each parameter is created straight into its sharding with
`jax.make_array_from_callback`, whose callback reads (in the checkpoint's storage dtype)
only the tensors of the layers in that shard, so the host never holds the model in
float32 at once. A tensor the table does not consume is an error naming it (a tensor this
framework would silently drop changes the model), except known non-parameter buffers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import errors
from rlhf_jax.models import ModelConfig

Path = tuple[str, ...]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some checkpoints carry that are not parameters (causal masks, RoPE tables).
IGNORED = re.compile(r"(\.attn\.(masked_)?bias|\.rotary_emb\.inv_freq)$")
# Gemma 2/3 name their four block norms differently: post_attention_layernorm is the norm
# of the attention output there, the MLP's input norm is pre_feedforward_layernorm.
GEMMA = ("gemma2", "gemma3_text")


@dataclasses.dataclass(frozen=True)
class Source:
  """One of our parameters: made by `fn` from the Hugging Face tensors `names`."""

  names: tuple[str, ...]
  fn: Callable[..., np.ndarray]


@dataclasses.dataclass(frozen=True)
class Table:
  """Per-layer entries (paths inside a block, names with `{i}`) and the others."""

  layer: dict[Path, Source]
  top: dict[Path, Source]


def _prefix(kind: str) -> str:
  return "transformer." if kind == "gpt2" else "model."


def import_table(kind: str, cfg: ModelConfig, *, classifier: bool = False) -> Table:
  """How each of our parameters is made from a `kind` checkpoint's tensors."""
  d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
  p = _prefix(kind)
  trunk: dict[Path, Source] = {("trunk", "embedding"): Source((f"{p}embed_tokens.weight",), _same)}
  if kind == "gpt2":
    b = p + "h.{i}."
    split = lambda part, heads: (
      lambda w: w[..., part * d : (part + 1) * d].reshape(*w.shape[:-1], heads, h)
    )
    layer = {
      ("attn_norm", "scale"): Source((b + "ln_1.weight",), _same),
      ("attn_norm", "bias"): Source((b + "ln_1.bias",), _same),
      ("attn", "q"): Source((b + "attn.c_attn.weight",), split(0, n)),
      ("attn", "k"): Source((b + "attn.c_attn.weight",), split(1, n)),
      ("attn", "v"): Source((b + "attn.c_attn.weight",), split(2, n)),
      ("attn", "q_bias"): Source((b + "attn.c_attn.bias",), split(0, n)),
      ("attn", "k_bias"): Source((b + "attn.c_attn.bias",), split(1, n)),
      ("attn", "v_bias"): Source((b + "attn.c_attn.bias",), split(2, n)),
      ("attn", "o"): Source((b + "attn.c_proj.weight",), lambda w: w.reshape(n, h, d)),
      ("attn", "o_bias"): Source((b + "attn.c_proj.bias",), _same),
      ("mlp_norm", "scale"): Source((b + "ln_2.weight",), _same),
      ("mlp_norm", "bias"): Source((b + "ln_2.bias",), _same),
      ("mlp", "up"): Source((b + "mlp.c_fc.weight",), _same),
      ("mlp", "up_bias"): Source((b + "mlp.c_fc.bias",), _same),
      ("mlp", "down"): Source((b + "mlp.c_proj.weight",), _same),
      ("mlp", "down_bias"): Source((b + "mlp.c_proj.bias",), _same),
    }
    trunk = {
      ("trunk", "embedding"): Source((p + "wte.weight",), _same),
      ("trunk", "pos_embedding"): Source((p + "wpe.weight",), _same),
      ("trunk", "final_norm", "scale"): Source((p + "ln_f.weight",), _same),
      ("trunk", "final_norm", "bias"): Source((p + "ln_f.bias",), _same),
    }
  else:
    b = p + "layers.{i}."
    heads_in = lambda heads: lambda w: w.T.reshape(d, heads, h)  # [heads*H, D] -> [D, N, H]
    layer = {
      ("attn_norm", "scale"): Source((b + "input_layernorm.weight",), _same),
      ("attn", "q"): Source((b + "self_attn.q_proj.weight",), heads_in(n)),
      ("attn", "k"): Source((b + "self_attn.k_proj.weight",), heads_in(k)),
      ("attn", "v"): Source((b + "self_attn.v_proj.weight",), heads_in(k)),
      ("attn", "o"): Source((b + "self_attn.o_proj.weight",), lambda w: w.T.reshape(n, h, d)),
      ("mlp_norm", "scale"): Source((b + "post_attention_layernorm.weight",), _same),
      ("mlp", "gate"): Source((b + "mlp.gate_proj.weight",), _transpose),
      ("mlp", "up"): Source((b + "mlp.up_proj.weight",), _transpose),
      ("mlp", "down"): Source((b + "mlp.down_proj.weight",), _transpose),
    }
    if kind in GEMMA:
      layer[("attn_post_norm", "scale")] = Source((b + "post_attention_layernorm.weight",), _same)
      layer[("mlp_norm", "scale")] = Source((b + "pre_feedforward_layernorm.weight",), _same)
      layer[("mlp_post_norm", "scale")] = Source((b + "post_feedforward_layernorm.weight",), _same)
    if cfg.qk_norm:
      layer[("attn", "q_norm")] = Source((b + "self_attn.q_norm.weight",), _same)
      layer[("attn", "k_norm")] = Source((b + "self_attn.k_norm.weight",), _same)
    if cfg.qkv_bias:
      for name, heads in (("q", n), ("k", k), ("v", k)):
        layer[("attn", f"{name}_bias")] = Source(
          (b + f"self_attn.{name}_proj.bias",), lambda w, heads=heads: w.reshape(heads, h)
        )
    trunk[("trunk", "final_norm", "scale")] = Source((p + "norm.weight",), _same)
  top = dict(trunk)
  if classifier:  # one label: score.weight [1, D]; a Hugging Face score has no bias
    top[("head", "kernel")] = Source(("score.weight",), lambda w: w.reshape(-1))
    top[("head", "bias")] = Source((), lambda: np.zeros((), np.float32))
  elif not cfg.tie_embeddings:
    top[("lm_head",)] = Source(("lm_head.weight",), _transpose)
  return Table(layer, top)


def export_table(kind: str, cfg: ModelConfig, *, classifier: bool = False) -> Table:
  """How each Hugging Face tensor is made from our parameters (`import_table` reversed):
  entries map a tensor name to `Source(our paths, fn)`."""
  d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
  p = _prefix(kind)
  if kind == "gpt2":
    b = p + "h.{i}."
    fuse = lambda *parts: np.concatenate([x.reshape(*x.shape[:-2], -1) for x in parts], axis=-1)
    layer = {
      b + "ln_1.weight": Source((("attn_norm", "scale"),), _same),
      b + "ln_1.bias": Source((("attn_norm", "bias"),), _same),
      b + "attn.c_attn.weight": Source((("attn", "q"), ("attn", "k"), ("attn", "v")), fuse),
      b + "attn.c_attn.bias": Source(
        (("attn", "q_bias"), ("attn", "k_bias"), ("attn", "v_bias")), fuse
      ),
      b + "attn.c_proj.weight": Source((("attn", "o"),), lambda w: w.reshape(n * h, d)),
      b + "attn.c_proj.bias": Source((("attn", "o_bias"),), _same),
      b + "ln_2.weight": Source((("mlp_norm", "scale"),), _same),
      b + "ln_2.bias": Source((("mlp_norm", "bias"),), _same),
      b + "mlp.c_fc.weight": Source((("mlp", "up"),), _same),
      b + "mlp.c_fc.bias": Source((("mlp", "up_bias"),), _same),
      b + "mlp.c_proj.weight": Source((("mlp", "down"),), _same),
      b + "mlp.c_proj.bias": Source((("mlp", "down_bias"),), _same),
    }
    top = {
      p + "wte.weight": Source((("trunk", "embedding"),), _same),
      p + "wpe.weight": Source((("trunk", "pos_embedding"),), _same),
      p + "ln_f.weight": Source((("trunk", "final_norm", "scale"),), _same),
      p + "ln_f.bias": Source((("trunk", "final_norm", "bias"),), _same),
    }
  else:
    b = p + "layers.{i}."
    heads_out = lambda w: w.reshape(d, -1).T  # [D, N, H] -> [N*H, D]
    layer = {
      b + "input_layernorm.weight": Source((("attn_norm", "scale"),), _same),
      b + "self_attn.q_proj.weight": Source((("attn", "q"),), heads_out),
      b + "self_attn.k_proj.weight": Source((("attn", "k"),), heads_out),
      b + "self_attn.v_proj.weight": Source((("attn", "v"),), heads_out),
      b + "self_attn.o_proj.weight": Source((("attn", "o"),), lambda w: w.reshape(n * h, d).T),
      b + "post_attention_layernorm.weight": Source((("mlp_norm", "scale"),), _same),
      b + "mlp.gate_proj.weight": Source((("mlp", "gate"),), _transpose),
      b + "mlp.up_proj.weight": Source((("mlp", "up"),), _transpose),
      b + "mlp.down_proj.weight": Source((("mlp", "down"),), _transpose),
    }
    if kind in GEMMA:
      layer[b + "post_attention_layernorm.weight"] = Source((("attn_post_norm", "scale"),), _same)
      layer[b + "pre_feedforward_layernorm.weight"] = Source((("mlp_norm", "scale"),), _same)
      layer[b + "post_feedforward_layernorm.weight"] = Source((("mlp_post_norm", "scale"),), _same)
    if cfg.qk_norm:
      layer[b + "self_attn.q_norm.weight"] = Source((("attn", "q_norm"),), _same)
      layer[b + "self_attn.k_norm.weight"] = Source((("attn", "k_norm"),), _same)
    if cfg.qkv_bias:
      for name in ("q", "k", "v"):
        layer[b + f"self_attn.{name}_proj.bias"] = Source(
          (("attn", f"{name}_bias"),), lambda w: w.reshape(-1)
        )
    top = {
      p + "embed_tokens.weight": Source((("trunk", "embedding"),), _same),
      p + "norm.weight": Source((("trunk", "final_norm", "scale"),), _same),
    }
  del k
  if classifier:
    top["score.weight"] = Source((("head", "kernel"),), lambda w: w.reshape(1, -1))
  elif not cfg.tie_embeddings:
    top["lm_head.weight"] = Source((("lm_head",),), _transpose)
  return Table(layer, top)


def _same(w):
  return w


def _transpose(w):
  return w.T


# -------------------------------------------------------------------- reading


class Reader:
  """The tensors of a Hugging Face model directory (one safetensors file, or shards with
  an index), read one at a time on the host in their storage dtype."""

  def __init__(self, directory: str):
    from safetensors import safe_open

    self.directory = directory
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError, TypeError) as error:
        raise errors.DataError(index, 0, f"not a readable safetensors index: {error}") from None
      files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
      files, weight_map = [SINGLE_FILE], None
    else:
      raise errors.DataError(
        directory, 0, f"holds neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors are read)"
      )
    self._files: dict[str, Any] = {}
    self._where: dict[str, str] = {}
    for name in files:
      path = os.path.join(directory, name)
      try:
        handle = safe_open(path, framework="flax")
      except Exception as error:  # safetensors raises its own error types
        raise errors.DataError(path, 0, f"not a readable safetensors file: {error}") from None
      self._files[name] = handle
      for key in handle.keys():
        self._where[key] = name
    if weight_map is not None:
      missing = sorted(set(weight_map) - set(self._where))
      if missing:
        raise errors.DataError(index, 0, f"tensor {missing[0]!r} is in the index, not in its file")
    self._cache: tuple[str, np.ndarray] | None = None

  def names(self) -> set[str]:
    return set(self._where)

  def get(self, name: str) -> np.ndarray:
    """A tensor as a host array in its storage dtype (the last one read is kept)."""
    if self._cache is not None and self._cache[0] == name:
      return self._cache[1]
    if name not in self._where:
      raise errors.DataError(self.directory, 0, f"tensor {name!r} is missing")
    with jax.default_device(jax.devices("cpu")[0]):
      array = np.asarray(self._files[self._where[name]].get_tensor(name))
    self._cache = (name, array)
    return array


def _resolve_gpt2_prefix(table: Table, reader: Reader) -> Table:
  """Original GPT-2 checkpoints name tensors without the `transformer.` prefix."""
  names = reader.names()
  if "transformer.wte.weight" in names or "wte.weight" not in names:
    return table
  strip = lambda s: s.removeprefix("transformer.")
  fix = lambda src: Source(tuple(strip(x) for x in src.names), src.fn)
  return Table(
    {k: fix(v) for k, v in table.layer.items()}, {k: fix(v) for k, v in table.top.items()}
  )


def load(directory: str, kind: str, cfg: ModelConfig, abstract, *, classifier: bool = False) -> Any:
  """Our parameter tree from a checkpoint, each leaf created in its sharding.

  `abstract`: the tree of `jax.ShapeDtypeStruct`s (shape, dtype, sharding) to fill, as
  `jax.eval_shape` of the model's init with shardings attached; stacked layers (scan) or
  one subtree per layer (`layer_{i}`) are both read. Every tensor's shape is checked, and
  every tensor of the checkpoint must be used (`IGNORED` buffers aside).
  """
  reader = Reader(directory)
  table = import_table(kind, cfg, classifier=classifier)
  if kind == "gpt2":
    table = _resolve_gpt2_prefix(table, reader)
  used: set[str] = set()

  def source_for(path: Path) -> tuple[Source, list[int] | None]:
    if len(path) > 2 and path[:2] == ("trunk", "layers"):
      return table.layer.get(path[2:]), list(range(cfg.num_layers))
    if len(path) > 2 and path[0] == "trunk" and path[1].startswith("layer_"):
      src = table.layer.get(path[2:])
      return src, [int(path[1].removeprefix("layer_"))]
    return table.top.get(path), None

  def build(key_path, leaf):
    path = tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in key_path)
    src, layers = source_for(path)
    if src is None:
      raise ValueError(f"No Hugging Face tensor maps to parameter {'/'.join(path)}.")
    stacked = layers is not None and len(path) > 1 and path[1] == "layers"
    # Each layer's tensor, read once for all the shards of this parameter (the devices that
    # hold the same rows, or other columns of them, reuse it) and dropped with it: the host
    # holds at most one parameter in its storage dtype.
    read: dict[int | None, np.ndarray] = {}

    def one(i: int | None) -> np.ndarray:
      if i in read:
        return read[i]
      names = [name.format(i=i) for name in src.names]
      used.update(names)
      value = src.fn(*(reader.get(name) for name in names))
      expected = leaf.shape[1:] if stacked else leaf.shape
      if tuple(value.shape) != tuple(expected):
        raise errors.DataError(
          directory, 0, f"tensor {names[0]!r} has shape {reader.get(names[0]).shape}; "
          f"config.json implies {tuple(expected)} for it"
        )  # fmt: skip
      read[i] = value
      return value

    def callback(index):
      if not stacked:
        return np.asarray(one(layers[0] if layers else None)[index]).astype(leaf.dtype)
      rows = range(cfg.num_layers)[index[0]]
      out = None
      for j, i in enumerate(rows):  # one layer's tensor at a time on the host
        part = np.asarray(one(i)[index[1:]]).astype(leaf.dtype)
        if out is None:
          out = np.empty((len(rows), *part.shape), leaf.dtype)
        out[j] = part
      return out

    array = jax.make_array_from_callback(leaf.shape, leaf.sharding, callback)
    read.clear()
    return array

  params = jax.tree_util.tree_map_with_path(build, abstract)
  leftover = sorted(
    name for name in reader.names() - used if not IGNORED.search(name)
    and not (name == "lm_head.weight" and cfg.tie_embeddings)
  )  # fmt: skip
  if leftover:
    raise errors.DataError(
      directory, 0, f"tensor {leftover[0]!r} is not supported (this model has no parameter "
      f"it maps to{'; and ' + str(len(leftover) - 1) + ' more' if len(leftover) > 1 else ''})"
    )  # fmt: skip
  return params


# -------------------------------------------------------------------- writing


def hf_tensors(
  params, kind: str, cfg: ModelConfig, *, classifier: bool = False, dtype: str = "float32"
) -> dict[str, jax.Array]:
  """Every Hugging Face tensor of our parameters (host arrays, `dtype`), by name."""
  table = export_table(kind, cfg, classifier=classifier)
  stacked = "layers" in params["trunk"]

  def ours(path: Path, i: int | None) -> np.ndarray:
    if i is not None:
      block = params["trunk"]["layers"] if stacked else params["trunk"][f"layer_{i}"]
      leaf = block
      for key in path:
        leaf = leaf[key]
      return np.asarray(jax.device_get(leaf[i] if stacked else leaf), np.float32)
    leaf = params
    for key in path:
      leaf = leaf[key]
    return np.asarray(jax.device_get(leaf), np.float32)

  out = {}
  for i in range(cfg.num_layers):
    for name, src in table.layer.items():
      out[name.format(i=i)] = src.fn(*(ours(path, i) for path in src.names))
  for name, src in table.top.items():
    out[name] = src.fn(*(ours(path, None) for path in src.names))
  return {name: jnp.asarray(np.ascontiguousarray(v), dtype) for name, v in out.items()}


def save(tensors: dict[str, jax.Array], directory: str, max_shard_bytes: int = 4 << 30) -> None:
  """Writes `tensors` as `model.safetensors`, or as shards with an index when larger than
  `max_shard_bytes` (the layout `transformers` writes and reads)."""
  from safetensors.flax import save_file

  shards: list[dict[str, jax.Array]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  metadata = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], os.path.join(directory, SINGLE_FILE), metadata=metadata)
    return
  weight_map = {}
  for j, shard in enumerate(shards):
    name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, name), metadata=metadata)
    weight_map.update(dict.fromkeys(shard, name))
  total = sum(t.nbytes for t in tensors.values())
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
