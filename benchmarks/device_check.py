"""The project's accelerator figures in one run, one JSON line per figure on stdout.

  bash benchmarks/device_check.sh                # full size on a GPU/TPU, tiny on CPU
  bash benchmarks/device_check.sh --size=tiny    # what CI runs, in well under a minute
  bash benchmarks/device_check.sh --figures=train_step,decode

In order (docs/benchmarks.md says what each field means):

  correctness    the sharding-equivalence and sampler tests, run by pytest on the device
                 itself: numbers that come from a device where the code computes something
                 else are worthless, so this line comes first.
  train_step     one optimizer step of a ~1B Llama (`llama3.2-1b`) in bfloat16 compute:
                 tokens/s and MFU against the vendor's dense bf16 peak; goal 0.5.
  decode         the KV-cache sampler's per-step time against the memory roofline (weights
                 plus the KV cache at the average filled length, over the device's
                 memory bandwidth); goal 0.6 of the roofline's tokens/s.
  ppo_iteration  one PPO iteration (policy, separate critic, reference and reward model all
                 1B) split into generation, scoring and update, timed as the trainer times it
                 (`rl_common.PhaseClock`).

Logs go to stderr. A figure that fails prints {"figure": ..., "error": ...} and the others
still run; the exit status is 1 if any figure failed or any test failed. `--size=tiny` runs
the same code on a two-layer, d_model 64 model and a couple of fast tests, so CI knows the
script works; its timings mean nothing.

The tests run in a pytest subprocess before this process touches a device: a TPU can be
opened by one process at a time, and a GPU process preallocates most of the memory.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

from absl import app, flags, logging

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ("correctness", "train_step", "decode", "ppo_iteration")
MFU_GOAL = 0.5
DECODE_ROOFLINE_GOAL = 0.6

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags, defined only when the script runs: absl flags are global,
  and tests import this module next to others that define `size` or `steps`."""
  flags.DEFINE_enum("size", "auto", ["auto", "full", "tiny"], "auto: full on GPU/TPU, tiny on CPU.")
  flags.DEFINE_list("figures", list(FIGURES), f"Which figures to produce, of {FIGURES}.")
  flags.DEFINE_integer("steps", 0, "Timed repetitions per figure (0: the size's default).")
  flags.DEFINE_multi_string(
    "model_override",
    [],
    "FIELD=VALUE of ModelConfig for every figure (e.g. remat=full); repeatable.",
  )


@dataclasses.dataclass(frozen=True)
class Size:
  """The shapes of one size. Batch sizes marked per_device scale with the device count."""

  name: str
  model: str
  model_overrides: tuple[tuple[str, int], ...]
  remat: str
  train_batch_per_device: int
  train_seq_len: int
  decode_batch: int
  decode_prompt_len: int
  decode_new_tokens: int
  ppo_rollout_per_device: int
  ppo_minibatch_per_device: int
  ppo_prompt_len: int
  ppo_new_tokens: int
  ppo_epochs: int
  steps: int
  tests: tuple[str, ...] | None  # None: the sharding and sampler tests that fit the devices
  tests_timeout_s: int


# ~1.24B parameters (128k vocabulary, tied). Train: 8 x 1024 tokens per device with the
# "dots" remat policy (matmul outputs kept, attention recomputed); the float32 logits of
# 8k tokens (4 GiB a copy) and the master weights with Adam (20 GiB) fit an 80 GB H100
# with room. Decode: 64 rows, the 128-token prompts PPO would use, 256 new tokens.
# PPO: 32 rollouts of 128 + 128 tokens, 2 epochs of minibatches of 8 (four 1B networks and
# two Adam states are ~40 GB of float32 parameters).
FULL = Size(
  name="full",
  model="llama3.2-1b",
  model_overrides=(),
  remat="dots",
  train_batch_per_device=8,
  train_seq_len=1024,
  decode_batch=64,
  decode_prompt_len=128,
  decode_new_tokens=256,
  ppo_rollout_per_device=32,
  ppo_minibatch_per_device=8,
  ppo_prompt_len=128,
  ppo_new_tokens=128,
  ppo_epochs=2,
  steps=5,
  tests=None,
  tests_timeout_s=420,
)

# Everything small enough that the whole script takes well under a minute on 2 CPU cores.
TINY = Size(
  name="tiny",
  model="tiny",
  model_overrides=(("d_model", 64), ("num_layers", 2)),
  remat="none",
  train_batch_per_device=1,
  train_seq_len=32,
  decode_batch=4,
  decode_prompt_len=8,
  decode_new_tokens=24,
  ppo_rollout_per_device=2,
  ppo_minibatch_per_device=1,
  ppo_prompt_len=8,
  ppo_new_tokens=8,
  ppo_epochs=1,
  steps=2,
  tests=(
    "tests/test_sharding.py::test_make_mesh_resolves_minus_one_and_validates",
    "tests/rl/test_sampler.py::test_filter_logits_hand_example",
  ),
  tests_timeout_s=120,
)

SIZES = {"full": FULL, "tiny": TINY}


# ------------------------------------------------------------------------------- helpers


def emit(line: dict) -> None:
  """One JSON line on stdout; NaN/inf become null (bare NaN is not JSON)."""
  clean = {
    k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in line.items()
  }
  print(json.dumps(clean), flush=True)


def probe() -> dict:
  """The default backend's platform, device kind and count, from a throwaway process.

  Asked in a subprocess so that this process opens no device before the tests' pytest does.
  With JAX_PLATFORMS=cpu (CI) the answer is known without starting JAX.
  """
  if os.environ.get("JAX_PLATFORMS") == "cpu":
    return dict(platform="cpu", device_kind="cpu", count=None)
  code = (
    "import jax, json; d = jax.devices(); "
    "print(json.dumps(dict(platform=d[0].platform, device_kind=d[0].device_kind, count=len(d))))"
  )
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
  if out.returncode != 0:
    raise RuntimeError(f"JAX could not list the devices:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _time(fn, steps: int) -> float:
  """benchmarks.train_step.time_fn, imported late (it imports JAX)."""
  from benchmarks.train_step import time_fn

  return time_fn(fn, steps)


def _is_oom(error: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def halving_on_oom(run, batch: int, floor: int):
  """`run(batch)`, halving the batch while the device runs out of memory.

  The full shapes are sized for an 80 GB H100 from estimates; a device with less memory
  should still give a figure (at the batch the line reports) rather than none.
  """
  while True:
    try:
      return run(batch)
    except Exception as e:  # the device's out-of-memory error; anything else is raised
      if not _is_oom(e) or batch // 2 < floor:
        raise
      logging.warning("Out of memory at batch %d; retrying at %d.", batch, batch // 2)
    batch //= 2
    gc.collect()


def choose_param_dtype(num_params: int, bytes_per_float32_param: int, num_devices: int):
  """("float32" or "bfloat16", why): float32 master weights unless they cannot fit.

  `bytes_per_float32_param` counts what lives per parameter (params, gradients, optimizer
  moments, frozen copies). Float32 is kept when that is under 60% of the devices' memory,
  leaving the rest to activations; devices that do not report memory (CPU) keep float32.
  """
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  need = num_params * bytes_per_float32_param
  if not limit or need <= 0.6 * limit * num_devices:
    return "float32", "float32 master weights"
  return "bfloat16", (
    f"bfloat16 parameters: float32 state needs {need / 2**30:.0f} GiB, over 60% of "
    f"{num_devices} x {limit / 2**30:.0f} GiB"
  )


def _parse_override(text: str) -> tuple[str, object]:
  field, sep, value = text.partition("=")
  if not sep:
    raise app.UsageError(f"--model_override={text!r}: expected FIELD=VALUE.")
  for parse in (int, float):
    try:
      return field, parse(value)
    except ValueError:
      pass
  return field, {"true": True, "false": False}.get(value.lower(), value)


def model_config(size: Size, **overrides):
  """The size's model with the figure's `overrides`, then the command line's on top."""
  from rlhf_jax import models

  user = dict(_parse_override(o) for o in FLAGS.model_override) if FLAGS.is_parsed() else {}
  return models.get_model_config(size.model, **{**dict(size.model_overrides), **overrides, **user})


def training_config(size: Size, bytes_per_param: int, num_devices: int):
  """(config, why): the size's model in bfloat16 compute, its master weights in float32
  where `bytes_per_param` of float32 state fit the devices (`choose_param_dtype`)."""
  params = model_config(size).num_params()
  param_dtype, why = choose_param_dtype(params, bytes_per_param, num_devices)
  return model_config(size, dtype="bfloat16", param_dtype=param_dtype, remat=size.remat), why


def _common(size: Size, cfg) -> dict:
  import jax

  device = jax.devices()[0]
  return dict(
    model=size.model,
    model_overrides=list(FLAGS.model_override) if FLAGS.is_parsed() else [],
    params=cfg.num_params(),
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    device_kind=device.device_kind,
    platform=device.platform,
  )


# --------------------------------------------------------------------------- correctness


def select_tests(size: Size, num_devices: int) -> tuple[list[str], str]:
  """(pytest arguments, a word for the line): which tests fit `num_devices` devices.

  With 8 or more, both files whole (their meshes use up to 8). With fewer, the sharded
  update cases whose mesh fits (read from the test's own CASES) and the sampler tests but
  the sharded sampler's (all its meshes use 8 devices).
  """
  if size.tests is not None:
    return list(size.tests), "ci subset"
  files = ["tests/test_sharding.py", "tests/rl/test_sampler.py"]
  if num_devices >= 8:
    return files, "all"
  from tests import test_sharding

  cases = [
    f"tests/test_sharding.py::test_sharded_update_matches_single_device[{preset}-mesh_shape{i}]"
    for i, (preset, mesh) in enumerate(test_sharding.CASES)
    if math.prod(mesh) <= num_devices
  ]
  deselect = ["--deselect", "tests/rl/test_sampler.py::test_sharded_sampler_matches_single_device"]
  return [*cases, files[1], *deselect], f"the cases that fit {num_devices} device(s)"


def cpu_test_devices() -> int:
  """The CPU devices tests/conftest.py gives the tests: 8, unless XLA_FLAGS already says."""
  found = re.search(r"xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  return int(found.group(1)) if found else 8


def correctness(size: Size, device: dict) -> dict:
  """Runs the selected tests with pytest on `device["platform"]` and counts the results.

  tests/conftest.py sets JAX_PLATFORMS=cpu only when it is unset, so an empty value lets
  JAX pick the accelerator. Matmuls run at "highest" precision there: the tests' float32
  tolerances (rtol 2e-5) are below TF32's and the TPU's default bf16 passes, and the
  question here is whether the code computes the same thing, not at what precision.
  """
  env = dict(os.environ)
  on_accelerator = device["platform"] != "cpu"
  if on_accelerator:
    env["JAX_PLATFORMS"] = ""
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
  devices = device["count"] if on_accelerator else cpu_test_devices()
  args, selection = select_tests(size, devices)
  with tempfile.TemporaryDirectory() as tmp:
    report = os.path.join(tmp, "junit.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", report]
    logging.info("correctness: %s", " ".join(cmd + args))
    start = time.perf_counter()
    # pytest's report goes to stderr: stdout carries the JSON lines only.
    result = subprocess.run(
      cmd + args, cwd=REPO_ROOT, env=env, stdout=sys.stderr, stderr=sys.stderr,
      timeout=size.tests_timeout_s,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    if os.path.exists(report):
      for suite in ET.parse(report).getroot().iter("testsuite"):
        for key in counts:
          counts[key] += int(suite.get(key, 0))
  failed = counts["failures"] + counts["errors"]
  if result.returncode != 0 and failed == 0:
    failed = 1  # pytest itself failed (no tests collected, an internal error)
  return dict(
    check="correctness",
    passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
    failed=failed,
    skipped=counts["skipped"],
    returncode=result.returncode,
    platform=device["platform"] if on_accelerator else "cpu",
    device_kind=device["device_kind"] if on_accelerator else "cpu",
    devices=devices,
    selection=selection,
    matmul_precision="highest" if on_accelerator else "default",
    seconds=seconds,
  )


# ---------------------------------------------------------------------------- train step


def train_step(size: Size, steps: int) -> dict:
  """Tokens/s and MFU of one AdamW step (next-token loss) on all devices, FSDP."""
  import jax

  from benchmarks.train_step import time_train_step
  from rlhf_jax import metrics, sharding

  mesh, rules = sharding.make_mesh((1, -1, 1)), "fsdp"
  n = mesh.size
  # float32 params, gradients and two Adam moments: 16 bytes a parameter.
  cfg, why = training_config(size, 16, n)
  seq = size.train_seq_len

  def run(batch):
    return batch, time_train_step(cfg, mesh, rules, batch, seq, steps)

  batch, seconds = halving_on_oom(run, size.train_batch_per_device * n, floor=n)
  n_tokens = batch * seq
  flops = cfg.train_flops_per_token(seq) * n_tokens
  device = jax.devices()[0]
  peak, peak_note = metrics.peak_flops_per_device(device, cfg.dtype)
  mfu = metrics.mfu(flops, seconds, n, peak)
  vendor_peak = device.platform != "cpu" and math.isfinite(mfu)
  return dict(
    figure="train_step",
    **_common(size, cfg),
    param_dtype_reason=why,
    remat=cfg.remat,
    num_devices=n,
    batch=batch,
    seq_len=seq,
    step_s=seconds,
    tokens_per_s=n_tokens / seconds,
    flops_per_step=flops,
    tflops_per_s=flops / seconds / 1e12,
    mfu=mfu,
    peak_flops_per_device=peak,
    peak_source=peak_note,
    goal=MFU_GOAL,
    # A CPU's peak is nominal: no goal applies to it.
    met=(mfu >= MFU_GOAL) if vendor_peak else None,
  )


# -------------------------------------------------------------------------------- decode


def decode_bytes(cfg, params, batch: int, cache_len: float) -> tuple[float, float]:
  """(weight bytes, KV-cache bytes) one decode step must read at least.

  Every matmul weight is read once per step; with tied embeddings that includes the
  whole table (it is the LM head), untied the input table is only gathered (`batch` rows,
  left out). The KV cache is read up to the filled length: keys and values of every layer.
  """
  import jax
  import jax.numpy as jnp

  weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  if not cfg.tie_embeddings:
    table = params["trunk"]["embedding"]
    weights -= table.size * table.dtype.itemsize
  per_slot = 2 * cfg.num_layers * cfg.kv_heads * cfg.head_size * jnp.dtype(cfg.dtype).itemsize
  return float(weights), float(batch * cache_len * per_slot)


def decode(size: Size, steps: int) -> dict:
  """Decode step time of the KV-cache sampler on one device, against the memory roofline.

  Bfloat16 weights, as an inference server holds them. The step time is the difference of
  a call generating N tokens and one generating 1, over N - 1: the prefill and the call's
  fixed costs cancel (but for the prefill's attention over N - 1 more empty cache slots,
  which is small and counts against the decode figure). EOS is an id outside the
  vocabulary, so no row stops early and every call does the same work.
  """
  import jax
  import numpy as np

  from rlhf_jax import metrics, models, sharding
  from rlhf_jax.rl import sampler

  device = jax.devices()[0]
  mesh, rules = sharding.make_mesh((1, 1, 1), [device]), "fsdp"
  cfg = model_config(size, dtype="bfloat16", param_dtype="bfloat16")
  module = models.LanguageModel(cfg)
  params, shardings = sharding.init_sharded(
    lambda r: models.init_params(module, r), mesh, rules, jax.random.key(0)
  )
  b, p, n = size.decode_batch, size.decode_prompt_len, size.decode_new_tokens
  rng = np.random.default_rng(0)
  prompts = sharding.host_to_global(rng.integers(2, cfg.vocab_size, (b, p), np.int32), mesh)
  mask = sharding.host_to_global(np.ones((b, p), bool), mesh)

  def sampler_call(new_tokens):
    config = sampler.SamplerConfig(
      max_new_tokens=new_tokens, eos_id=cfg.vocab_size, pad_id=0, temperature=1.0
    )
    fn = sampler.make_sampler(module, config, mesh=mesh, rules=rules, param_shardings=shardings)
    return lambda: fn(params, prompts, mask, jax.random.key(1)).tokens

  call_s = _time(sampler_call(n), steps)
  one_s = _time(sampler_call(1), steps)
  step_s = (call_s - one_s) / (n - 1)
  if step_s <= 0:  # timing noise on a tiny model: fall back to the whole call
    step_s = call_s / n
  # Step t (0-based) attends to p + t + 1 slots: the mean over the N steps.
  avg_len = p + (n + 1) / 2
  weight_bytes, kv_bytes = decode_bytes(cfg, params, b, avg_len)
  _, kv_full = decode_bytes(cfg, params, b, p + n)
  bandwidth, bw_note = metrics.peak_memory_bandwidth(device)
  tokens_per_s = b / step_s
  roofline_step_s = roofline_tps = fraction = None
  if bandwidth:
    roofline_step_s = (weight_bytes + kv_bytes) / bandwidth
    roofline_tps = b / roofline_step_s
    fraction = tokens_per_s / roofline_tps
  return dict(
    figure="decode",
    **_common(size, cfg),
    batch=b,
    prompt_len=p,
    new_tokens=n,
    step_s=step_s,
    tokens_per_s=tokens_per_s,
    call_s=call_s,
    call_tokens_per_s=b * n / call_s,
    weight_bytes=weight_bytes,
    kv_bytes_avg=kv_bytes,
    avg_cache_len=avg_len,
    # The sampler's attention reads all P + N cache slots every step (masked): what it
    # reads, against the roofline's filled-length minimum.
    kv_bytes_read_by_sampler=kv_full,
    memory_bandwidth=bandwidth,
    bandwidth_source=bw_note,
    roofline_step_s=roofline_step_s,
    roofline_tokens_per_s=roofline_tps,
    roofline_fraction=fraction,
    goal=DECODE_ROOFLINE_GOAL,
    met=None if fraction is None else fraction >= DECODE_ROOFLINE_GOAL,
  )


# ------------------------------------------------------------------------- PPO iteration


def ppo_iteration(size: Size, steps: int) -> dict:
  """One PPO iteration's time split, built from the trainer's own pieces (`trainers.ppo`).

  The policy, a separate critic, the frozen reference and a one-member reward model are
  fresh random models of the same size (what they compute does not change what it costs).
  Iterations are timed as the trainer times its log steps (`rl_common.PhaseClock`); the
  first one compiles and is left out.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from rlhf_jax import metrics, models, optim, sharding
  from rlhf_jax.rl import sampler as sampler_lib
  from rlhf_jax.trainers import common, ppo, rl_common

  mesh, rules = sharding.make_mesh((1, -1, 1)), "fsdp"
  n = mesh.size
  # Policy and critic with gradients and two Adam moments (16 bytes each), reference and
  # reward model (4 each): 40 bytes a parameter at float32.
  cfg, why = training_config(size, 40, n)
  iterations = max(1, steps // 2)

  def run(rollout):
    minibatch = max(n, rollout * size.ppo_minibatch_per_device // size.ppo_rollout_per_device)
    s = ppo.Settings(
      prompt_len=size.ppo_prompt_len, max_new_tokens=size.ppo_new_tokens, temperature=1.0,
      missing_eos_score=None, clip_eps=0.2, loss_aggregation="token_mean",
      epochs=size.ppo_epochs, minibatch_size=minibatch, rollout_batch_size=rollout,
      kl_estimator="k1", whiten_rewards=False, gamma=1.0, lam=0.95, value_clip_eps=0.2,
      vf_coef=0.1, kl_controller="adaptive", kl_target=6.0, kl_horizon=10000.0,
    )  # fmt: skip
    policy = models.LanguageModel(cfg)
    init = lambda module, seed: sharding.init_sharded(
      lambda r: models.init_params(module, r), mesh, rules, jax.random.key(seed)
    )
    policy_params, policy_sh = init(policy, 0)
    value = models.ScalarModel(cfg, head_init="zeros")
    value_params, value_sh = init(value, 1)
    # Copies, not more inits (each a compile): the reference starts as the policy, and the
    # reward model (a ScalarModel as the critic) may as well start as the critic.
    reference_params = jax.tree.map(jnp.copy, policy_params)
    # What `rl_common.rm_score_fn` reads of a reward stage: one member, no normalisation.
    rm_params = jax.tree.map(lambda x: jnp.copy(x)[None], value_params)
    rm = _RewardStage(models.reward_model(cfg), rm_params, 1.0, 0.0)
    nets = ppo.Networks(policy, value, policy)

    updates = (iterations + 1) * s.updates_per_iteration
    optim_section = dict(name="adam_tf", lr=3e-5, schedule="linear", grad_clip_norm=1.0)
    policy_tx, lr_schedule = optim.make_optimizer(optim_section, updates)
    value_tx, _ = optim.make_optimizer({**optim_section, "lr": 1e-4}, updates)
    init_fn = functools.partial(
      ppo.init_state, policy_tx=policy_tx, value_tx=value_tx, kl_coef=0.05
    )
    key = jax.random.key(3)
    abstract = jax.eval_shape(init_fn, policy_params, value_params, key)
    state_sh = ppo.state_shardings(abstract, policy_sh, value_sh, mesh)
    rep = common.replicated(mesh)
    batch_sh, vec_sh = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
    sample_sh = sampler_lib.SampleOutput(batch_sh, batch_sh, batch_sh, batch_sh, vec_sh, vec_sh)
    sample_config = sampler_lib.SamplerConfig(
      max_new_tokens=s.max_new_tokens, eos_id=cfg.vocab_size, pad_id=0, temperature=1.0
    )
    sample_fn = sampler_lib.make_sampler(
      policy, sample_config, mesh=mesh, rules=rules, param_shardings=policy_sh
    )
    experience_fn = jax.jit(
      functools.partial(
        ppo.make_experience, nets=nets, rm_score=rl_common.rm_score_fn(rm, s.prompt_len), s=s
      ),
      in_shardings=(state_sh, policy_sh, batch_sh, batch_sh, sample_sh),
    )
    update_fn = jax.jit(
      functools.partial(
        ppo.update, nets=nets, policy_tx=policy_tx, value_tx=value_tx,
        lr_schedule=lr_schedule, s=s,
      ),
      in_shardings=(state_sh, None, rep),
      out_shardings=(state_sh, rep),
      donate_argnums=(0,),
    )  # fmt: skip
    state = jax.jit(init_fn, out_shardings=state_sh, donate_argnums=(0, 1))(
      policy_params, value_params, key
    )
    del policy_params, value_params
    rng = np.random.default_rng(0)
    shape = (rollout, s.prompt_len)
    prompt = sharding.host_to_global(rng.integers(2, cfg.vocab_size, shape, np.int32), mesh)
    pmask = sharding.host_to_global(np.ones(shape, bool), mesh)
    times = []
    for i in range(1 + iterations):
      phases = rl_common.PhaseClock(True, state)
      with sharding.use_mesh(mesh, rules):
        key = jax.random.key(100 + i)
        sample = phases(sample_fn(ppo.lm_params(state["policy"]), prompt, pmask, key))
        exp, stats = phases(experience_fn(state, reference_params, prompt, pmask, sample))
        state, _ = phases(update_fn(state, exp, stats["objective/kl"]))
      if i:  # the first iteration compiles
        times.append(phases.metrics())
      logging.info("ppo iteration %d: %s", i, phases.metrics())
    return rollout, minibatch, s, times

  floor = n * size.ppo_rollout_per_device // size.ppo_minibatch_per_device
  rollout, minibatch, s, times = halving_on_oom(
    run, size.ppo_rollout_per_device * n, floor=max(n, floor)
  )
  mean = lambda key: float(np.mean([t[key] for t in times]))
  generation, scoring, update = (mean(f"time/{p}_s") for p in rl_common.PhaseClock.PHASES)
  total = generation + scoring + update
  flops = ppo.flops_per_iteration(cfg, s, separate_critic=True, ensemble=1)
  peak, peak_note = metrics.peak_flops_per_device(jax.devices()[0], cfg.dtype)
  return dict(
    figure="ppo_iteration",
    **_common(size, cfg),
    param_dtype_reason=why,
    remat=cfg.remat,
    num_devices=n,
    rollout_batch_size=rollout,
    minibatch_size=minibatch,
    ppo_epochs=s.epochs,
    prompt_len=s.prompt_len,
    max_new_tokens=s.max_new_tokens,
    timed_iterations=len(times),
    generation_s=generation,
    scoring_s=scoring,
    update_s=update,
    iteration_s=total,
    generation_fraction=generation / total,
    mfu=metrics.mfu(flops, total, n, peak),
    peak_source=peak_note,
  )


@dataclasses.dataclass
class _RewardStage:
  """The fields of `stages.RewardModel` that `rl_common.rm_score_fn` reads."""

  module: object
  params: object
  gain: float
  bias: float


# ---------------------------------------------------------------------------------- main


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.figures) - set(FIGURES))
  if unknown:
    raise app.UsageError(f"--figures: unknown {unknown}; known: {list(FIGURES)}.")
  start = time.perf_counter()
  device = probe()
  name = FLAGS.size if FLAGS.size != "auto" else ("tiny" if device["platform"] == "cpu" else "full")
  size = SIZES[name]
  steps = FLAGS.steps or size.steps
  logging.info("device_check: size=%s on %s x %s", name, device["count"], device["device_kind"])
  ok = True
  if "correctness" in FLAGS.figures:
    try:
      line = correctness(size, device)
      ok &= line["failed"] == 0
    except Exception as e:  # a hung or broken pytest must not lose the figures
      logging.exception("correctness failed")
      line, ok = dict(check="correctness", error=f"{type(e).__name__}: {e}"[:2000]), False
    emit({**line, "size": name})
  if name == "tiny" and device["platform"] == "cpu":
    # Tiny timings on a CPU mean nothing, and compiling without LLVM's optimisations roughly
    # halves the compile time. Read when this process's backend starts, after the tests ran.
    flag = "--xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  runners = {"train_step": train_step, "decode": decode, "ppo_iteration": ppo_iteration}
  for figure, fn in runners.items():
    if figure not in FLAGS.figures:
      continue
    t0 = time.perf_counter()
    try:
      line = fn(size, steps)
    except Exception as e:  # one failed figure must not lose the others
      logging.exception("%s failed", figure)
      line, ok = dict(figure=figure, error=f"{type(e).__name__}: {e}"[:2000]), False
    emit({**line, "size": name, "seconds": time.perf_counter() - t0})
    gc.collect()  # the figure's arrays go before the next one allocates
  logging.info("device_check: done in %.0f s", time.perf_counter() - start)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
