"""Meshes, logical-axis rules and sharded state.

Every parameter and key activation carries logical axis names (`embed`,
`mlp`, `heads`, `act_batch`, ...). A *rule set* maps each logical name to mesh
axes; presets swap together (data parallel, FSDP, FSDP + tensor parallel), so
the model code never mentions the mesh. The mesh has three axes:

  data    pure data parallelism: the batch is split, parameters replicated
  fsdp    the batch is split and parameters are sharded (ZeRO-3 style)
  tensor  attention heads, MLP hidden units and the vocabulary are split

State is never materialised unsharded: `init_sharded` traces the initializer
with `jax.eval_shape`, derives shardings from the logical names, then runs
`jax.jit(init, out_shardings=...)`.

A dimension whose size is not divisible by the mesh axes its rule names is
replicated instead (e.g. 2 KV heads on a tensor axis of 4); `logical_to_spec`
does that check so one rule set serves every model size.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax.core import meta

P = jax.P
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, Any], ...]

# Activations and the KV cache follow the batch over (data, fsdp) in every
# preset; only the parameter rules and the tensor-parallel activations differ.
_BATCH_RULES: Rules = (
  ("act_batch", BATCH_AXES),
  ("cache_batch", BATCH_AXES),
)
_TENSOR_ACT_RULES: Rules = (
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
  ("cache_kv_heads", "tensor"),
)

RULE_PRESETS: dict[str, Rules] = {
  # Parameters replicated on every device; batch split over data and fsdp.
  "dp": _BATCH_RULES,
  # Parameters sharded along d_model over fsdp (gathered per layer by XLA).
  "fsdp": (*_BATCH_RULES, ("embed", "fsdp")),
  # FSDP on d_model plus Megatron-style tensor parallelism on heads/mlp/vocab.
  "fsdp_tp": (
    *_BATCH_RULES,
    *_TENSOR_ACT_RULES,
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
  ),
}

_current_rules: contextvars.ContextVar[Rules] = contextvars.ContextVar(
  "rlhf_jax_logical_rules", default=RULE_PRESETS["fsdp_tp"]
)


def get_rules(preset_or_rules: str | Rules) -> Rules:
  """Returns the rule set for a preset name, or the rules unchanged."""
  if isinstance(preset_or_rules, str):
    if preset_or_rules not in RULE_PRESETS:
      raise ValueError(
        f"Unknown sharding rules preset {preset_or_rules!r}; known: {sorted(RULE_PRESETS)}."
      )
    return RULE_PRESETS[preset_or_rules]
  return tuple((name, axes) for name, axes in preset_or_rules)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules: str | Rules) -> Iterator[None]:
  """Sets the mesh (`jax.set_mesh`) and the logical rules for tracing code."""
  token = _current_rules.set(get_rules(rules))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _current_rules.reset(token)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """The (data, fsdp, tensor) sizes for `num_devices`, with a -1 filled in.

  Raises:
    ValueError: not three sizes, a size that is neither >= 1 nor -1, two -1s, or
      sizes that do not multiply to `num_devices` (a mesh smaller than the devices
      would silently leave some idle).
  """
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} entries {MESH_AXES}.")
  bad = [s for s in shape if isinstance(s, bool) or not isinstance(s, int) or (s < 1 and s != -1)]
  if bad:
    raise ValueError(
      f"mesh shape {tuple(shape)}: each size must be an int >= 1, or -1 for the rest."
    )
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one size may be -1.")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {num_devices} devices.")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
      f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, but {num_devices} are "
      "available (set a size to -1 to use all of them)."
    )
  return tuple(shape)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None):
  """Builds a (data, fsdp, tensor) mesh; one entry of `shape` may be -1.

  Args:
    shape: three sizes for (data, fsdp, tensor); -1 takes the remaining devices.
    devices: the devices to use (default: all of `jax.devices()`).
  """
  devices = list(devices) if devices is not None else jax.devices()
  shape = list(resolve_mesh_shape(shape, len(devices)))
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=axis_types, devices=devices)


def _axis_size(mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(
  names: Sequence[str | None] | None,
  shape: Sequence[int] | None = None,
  mesh=None,
  rules: str | Rules | None = None,
) -> jax.sharding.PartitionSpec:
  """Maps logical axis names to a mesh PartitionSpec.

  The first rule for a name whose mesh axes are still unused in this spec
  wins (like Flax's rules). With `shape` and `mesh`, a mesh axis that does not
  divide its dimension is dropped, and the dimension is replicated over it.
  """
  if names is None:
    return P()
  rules = _current_rules.get() if rules is None else get_rules(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    axes = None
    for rule_name, rule_axes in rules:
      if rule_name != name or rule_axes is None:
        continue
      cand = (rule_axes,) if isinstance(rule_axes, str) else tuple(rule_axes)
      if used.intersection(cand):
        continue
      if mesh is not None:
        cand = tuple(a for a in cand if a in mesh.shape and mesh.shape[a] > 1)
      if mesh is not None and shape is not None:
        # Keep the longest prefix of axes whose product divides the dimension.
        while cand and shape[i] % _axis_size(mesh, cand):
          cand = cand[:-1]
      if cand:
        axes = cand[0] if len(cand) == 1 else cand
        used.update(cand)
      break
    out.append(axes)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op outside a mesh.

  Models call this on key activations so the compiler is not left guessing.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return x
  spec = logical_to_spec(names, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


def unbox(boxed_tree: Any) -> Any:
  """Plain arrays (or ShapeDtypeStructs) from a tree of boxed Flax leaves."""
  return meta.unbox(boxed_tree)


def logical_specs(boxed_tree: Any) -> Any:
  """The tree of logical PartitionSpecs of a Flax tree of boxed (Partitioned) leaves."""
  return meta.get_partition_spec(boxed_tree)


def tree_shardings(abstract_tree: Any, logical_tree: Any, mesh, rules: str | Rules) -> Any:
  """NamedShardings for `abstract_tree` (arrays or ShapeDtypeStructs) from logical specs."""
  rules = get_rules(rules)

  def one(leaf, spec):
    names = tuple(spec) if spec is not None else None
    return jax.sharding.NamedSharding(mesh, logical_to_spec(names, leaf.shape, mesh, rules))

  return jax.tree.map(
    one, meta.unbox(abstract_tree), logical_tree, is_leaf=lambda x: isinstance(x, P)
  )


def init_sharded(
  init_fn: Callable[..., Any], mesh, rules: str | Rules, *args: Any
) -> tuple[Any, Any]:
  """Runs a Flax initializer directly into its sharded layout.

  Args:
    init_fn: returns a tree with boxed (logically partitioned) leaves, e.g.
      `lambda rng: model.init(rng, tokens)["params"]`.
    mesh: the device mesh.
    rules: logical-axis rules or a preset name.
    *args: arguments of `init_fn` (typically an RNG key).

  Returns:
    (tree of unboxed arrays, laid out per the rules; tree of their shardings).
  """
  with use_mesh(mesh, rules):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = tree_shardings(abstract, logical_specs(abstract), mesh, rules)
    init = jax.jit(lambda *a: meta.unbox(init_fn(*a)), out_shardings=shardings)
    return init(*args), shardings


def batch_sharding(mesh, ndim: int = 2) -> jax.sharding.NamedSharding:
  """Sharding of a host batch: leading (batch) dim over (data, fsdp)."""
  return jax.sharding.NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def host_to_global(batch: Any, mesh) -> Any:
  """Assembles per-process host arrays into global arrays sharded over the batch.

  Each process passes only its own rows (its share of the global batch); on
  one process the local batch is the global batch.
  """

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

  return jax.tree.map(one, batch)


def global_from_full(x: Any, mesh) -> jax.Array:
  """A global array sharded over the batch from a host array every process holds whole."""
  x = np.asarray(x)
  sh = batch_sharding(mesh, x.ndim)
  return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])


def fetch(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-process) global array, on every host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def reshard(tree: Any, shardings: Any, *, donate: bool = False) -> Any:
  """Moves a tree of arrays to new shardings (e.g. from one mesh to another)."""
  return jax.device_put(tree, shardings, donate=donate)


def describe(tree: Any) -> dict[str, str]:
  """'/'-joined path -> "shape spec" for each leaf: a readable layout summary."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    out[key] = f"{tuple(leaf.shape)} {spec}"
  return out
