"""No host round trip inside a PPO or GRPO iteration: its device part runs under a guard.

On an accelerator every host round trip inside an iteration (a `float(...)`, an
`np.asarray`, `.item()`, `jax.device_get`, a Python `if` on a device value, a Python
scalar or NumPy array handed to a jitted program) makes the host wait for the device and
then the device wait for the host, every iteration. The trainers keep the iteration on
device and read its statistics only at log steps, after it
(`common.LoopBookkeeping.after_update`). These tests hold them to that.

What runs under the guard is iterations 2 and 3 (the first one compiles) of the trainers'
own loop body (`ppo.iteration`, `grpo.iteration`) on the programs `train` builds
(`make_programs`: the same shardings and donation), for a tiny model on a 4-device mesh
with data, FSDP and tensor axes:

  - PPO: sampling (the jitted KV-cache sampler), `make_experience` (the policy's,
    reference's and critic's forward passes, the reward-model score, the KL penalty, GAE,
    whitening) and `update` (every minibatch of every epoch, and the KL controller);
  - GRPO with the reward model as the reward: sampling, `make_experience`, `update`;
  - GRPO with a host reward (`reward_fn="gold"` or a Python function): the same, except
    that by design the prompts and responses go to the host (`grpo.train`'s
    `score_on_host`: the gold reward reads text) and the scores come back with one explicit
    transfer; only that step lifts the guard (`host_allowed`).

Outside the guard, before the device part, are the iteration's host inputs: the prompt
batch (`sharding.host_to_global`, an explicit transfer) and the step's rollout key.
`train` folds the key from the step number on the host (a 4-byte host-to-device
transfer) and the sampler's jit copies it to the mesh's devices (a device-to-device
copy); both go one way, no round trip, but both are implicit, so here the key is placed
explicitly before the guard. After the device part comes the log step's explicit
`jax.device_get` of the statistics. The evaluation (held-out samples scored by the judge
on the host) runs on eval steps, outside the iteration.

The guard is `jax.transfer_guard("disallow")`: every implicit transfer, host to device,
device to host or between devices (a reshard between two programs), raises. On the CPU
backend the device-to-host check never fires, since a CPU buffer already is host memory
and reading it copies nothing, so `device_only` also refuses every read of an array's
value on the host (the path `float`, `bool`, `int`, `np.asarray` and `jax.device_get`
share; single-device CPU arrays also hand NumPy their memory directly, another reason the
pieces run on a mesh). `test_the_guard_catches_host_reads` checks that it does. Nothing
may compile after the first iteration either (`no_compiles`): a recompile per iteration
would be a host stall of its own.
"""

import contextlib
import functools
import inspect
import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax._src import array as array_impl

from rlhf_jax import models, sharding
from rlhf_jax.rl import sampler as sampler_lib
from rlhf_jax.trainers import common, grpo, ppo, rl_common
from tests.trainers.test_rl_parts import B, N, P, _grpo_settings, _ppo_settings

VOCAB, PAD, EOS = 32, 0, 1
RULES = "fsdp_tp"
STEPS = 3  # one to compile, two under the guard


@contextlib.contextmanager
def device_only():
  """No implicit transfer of any kind, and no read of an array's value on the host."""

  def refuse(array):
    raise AssertionError(
      f"A {array.dtype}{list(array.shape)} array was read on the host inside the device "
      "part of an iteration."
    )

  with pytest.MonkeyPatch.context() as patch:
    # Every conversion of a multi-device array to NumPy or Python reads this property; on
    # a GPU or TPU the transfer guard alone catches them.
    patch.setattr(array_impl.ArrayImpl, "_value", property(refuse))
    with jax.transfer_guard("disallow"):
      yield


_HOST_READ = inspect.getattr_static(array_impl.ArrayImpl, "_value")


@contextlib.contextmanager
def host_allowed():
  """Lifts `device_only` for an explicit host step inside the iteration (a host reward)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(array_impl.ArrayImpl, "_value", _HOST_READ)
    with jax.transfer_guard("allow"):
      yield


@contextlib.contextmanager
def no_compiles(caplog):
  """Fails if a program compiles inside: a recompile per iteration stalls the host."""
  start = len(caplog.records)
  with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles(True):
    yield
  compiled = [r.getMessage()[:80] for r in caplog.records[start:] if "Compiling" in r.getMessage()]
  assert not compiled, compiled


@pytest.fixture(scope="module")
def tiny():
  """A tiny policy, critic and two-member reward model on a (1, 2, 2) mesh, laid out by
  their logical axes as a loaded stage is, the prompt batch, and the sharded sampler."""
  mesh = sharding.make_mesh((1, 2, 2), jax.devices()[:4])
  cfg = models.get_model_config("tiny", vocab_size=VOCAB, d_model=32, num_layers=1, mlp_dim=64)
  lm = models.LanguageModel(cfg)
  critic = models.ScalarModel(cfg, head_init="zeros")
  reward = models.ScalarModel(cfg, head_init="reward")

  def init(module, seed):
    return sharding.init_sharded(
      lambda k: models.init_params(module, k), mesh, RULES, jax.random.key(seed)
    )

  lm_params, lm_sh = init(lm, 0)
  critic_params, critic_sh = init(critic, 1)
  members = [init(reward, seed)[0] for seed in (2, 3)]
  rm = types.SimpleNamespace(
    module=reward, params=jax.tree.map(lambda *x: jnp.stack(x), *members), gain=1.5, bias=-0.2
  )
  rng = np.random.default_rng(0)
  # Two prompts, each repeated for a group of four rows (GRPO's layout; PPO does not care).
  prompt = np.repeat(rng.integers(3, VOCAB, (B // 4, P)), 4, axis=0).astype(np.int32)
  pmask = np.ones((B, P), bool)
  pmask[:4, 0] = False  # the first prompt is left-padded
  prompt[~pmask] = PAD
  sampler = sampler_lib.SamplerConfig(
    max_new_tokens=N, eos_id=EOS, pad_id=PAD, temperature=1.0, num_valid=VOCAB
  )
  batch_sh = sharding.batch_sharding(mesh, 2)
  vec_sh = sharding.batch_sharding(mesh, 1)
  return dict(
    mesh=mesh, lm=lm, critic=critic, lm_params=lm_params, lm_sh=lm_sh,
    critic_params=critic_params, critic_sh=critic_sh, rm_score=rl_common.rm_score_fn(rm, P),
    batch={"tokens": prompt, "mask": pmask},
    sample_fn=sampler_lib.make_sampler(lm, sampler, mesh=mesh, rules=RULES, param_shardings=lm_sh),
    rep=common.replicated(mesh), batch_sh=batch_sh, vec_sh=vec_sh,
    sample_sh=sampler_lib.SampleOutput(batch_sh, batch_sh, batch_sh, batch_sh, vec_sh, vec_sh),
  )  # fmt: skip


def _inputs(t, step):
  """An iteration's host inputs, as `train` makes them: the prompts and the rollout key."""
  with sharding.use_mesh(t["mesh"], RULES):
    prompt = sharding.host_to_global(t["batch"]["tokens"], t["mesh"])
    pmask = sharding.host_to_global(t["batch"]["mask"], t["mesh"])
    key = jax.device_put(jax.random.fold_in(jax.random.key(7), step), t["rep"])
  return prompt, pmask, key


def _finite(stats) -> None:
  host = jax.device_get(stats)  # the log step's explicit read, after the guard
  bad = {k: v for k, v in host.items() if not np.all(np.isfinite(v))}
  assert not bad, bad


def test_the_guard_catches_host_reads(tiny):
  """`device_only` refuses each kind of transfer here, or the tests below prove nothing."""
  x = jax.device_put(np.arange(4.0, dtype=np.float32), tiny["rep"])
  scale = jax.jit(lambda v, c: v * c, in_shardings=(tiny["rep"], tiny["rep"]))
  first = jax.jit(lambda v: v[0])
  scale(x, first(x))  # compiled outside the guard
  uncommitted = jnp.float32(2.0)  # on one device: the program's other devices need a copy
  with device_only():
    c = first(x)
    scale(x, c)  # device values only: allowed
    for read in (float, bool, np.asarray, jax.device_get, lambda v: v.item()):
      with pytest.raises(AssertionError, match="read on the host"):
        read(c)
    with pytest.raises(Exception, match="host-to-device"):
      scale(x, 2.0)  # a Python scalar is a transfer per call
    with pytest.raises(Exception, match="host-to-device"):
      scale(x, np.float32(2.0))
    with pytest.raises(Exception, match="device-to-device"):
      scale(x, uncommitted)


@pytest.mark.parametrize("value_model", ["separate", "policy_head"])
def test_ppo_iteration_stays_on_device(tiny, value_model, caplog):
  s = _ppo_settings(kl_controller="adaptive", whiten_rewards=True, missing_eos_score=-1.0)
  mesh = tiny["mesh"]
  if value_model == "policy_head":
    stage = types.SimpleNamespace(
      module=tiny["lm"], params=tiny["lm_params"], shardings=tiny["lm_sh"]
    )
    nets, (policy, policy_sh), (value, value_sh) = ppo.networks(
      stage, None, value_model, mesh, RULES
    )
  else:
    nets = ppo.Networks(tiny["lm"], tiny["critic"], tiny["lm"])
    policy, policy_sh = tiny["lm_params"], tiny["lm_sh"]
    value, value_sh = tiny["critic_params"], tiny["critic_sh"]
  # What `ppo.train` builds: the state's shardings, the programs, the initial state.
  tx = optax.adam(1e-3)
  init = functools.partial(ppo.init_state, policy_tx=tx, value_tx=tx, kl_coef=0.1)
  key = jax.random.key(3)
  state_sh = ppo.state_shardings(
    jax.eval_shape(init, policy, value, key), policy_sh, value_sh, mesh
  )
  programs = ppo.make_programs(
    nets, tiny["sample_fn"], tiny["rm_score"], state_sh, tiny["lm_sh"], mesh, policy_tx=tx,
    value_tx=tx, lr_schedule=lambda c: 1e-3, s=s,
  )  # fmt: skip
  state = jax.jit(init, out_shardings=state_sh)(policy, value, key)

  def iteration(state, inputs):  # `ppo.train`'s loop body
    with sharding.use_mesh(mesh, RULES):
      return ppo.iteration(programs, state, tiny["lm_params"], *inputs)

  state, _ = iteration(state, _inputs(tiny, 0))  # compiles
  for step in range(1, STEPS):
    inputs = _inputs(tiny, step)
    with no_compiles(caplog), device_only():
      state, stats = iteration(state, inputs)
  _finite(stats)
  assert int(jax.device_get(state["step"])) == STEPS


@pytest.mark.parametrize("reward", ["model", "host"])
def test_grpo_iteration_stays_on_device(tiny, reward, caplog):
  s = _grpo_settings(epochs=2, missing_eos_score=-1.0)
  mesh, lm_sh = tiny["mesh"], tiny["lm_sh"]
  # What `grpo.train` builds: the state's shardings, the programs, the initial state.
  tx = optax.adam(1e-3)
  init = functools.partial(grpo.init_state, tx=tx)
  key = jax.random.key(3)
  abstract = jax.eval_shape(init, tiny["lm_params"], key)
  opt_sh = common.mirror_shardings(abstract["policy_opt"], abstract["policy"], lm_sh, mesh)
  state_sh = dict(policy=lm_sh, policy_opt=opt_sh, step=tiny["rep"], rng=tiny["rep"])
  programs = grpo.make_programs(
    tiny["lm"], tiny["sample_fn"], tiny["rm_score"] if reward == "model" else None, state_sh,
    lm_sh, mesh, tx=tx, lr_schedule=lambda c: 1e-3, s=s,
  )  # fmt: skip
  state = jax.jit(init, out_shardings=state_sh)(tiny["lm_params"], key)
  host_reads = []

  def score_on_host(prompt, sample):
    """`grpo.train`'s host reward: the rows go to the host (to be decoded and scored
    there), the scores come back as a sharded [B] array. The host boundary, by design."""
    with host_allowed():
      prompts, tokens = sharding.fetch(prompt), sharding.fetch(sample.tokens)
      scores = np.sum(tokens > VOCAB // 2, axis=-1) + 0.1 * prompts[:, -1]
      host_reads.append(len(scores))
      return (sharding.global_from_full(scores.astype(np.float32), mesh),)

  def iteration(state, inputs):  # `grpo.train`'s loop body
    with sharding.use_mesh(mesh, RULES):
      host = score_on_host if reward == "host" else None
      return grpo.iteration(programs, state, tiny["lm_params"], *inputs, host)

  state, _ = iteration(state, _inputs(tiny, 0))  # compiles
  for step in range(1, STEPS):
    inputs = _inputs(tiny, step)
    with no_compiles(caplog), device_only():
      state, stats = iteration(state, inputs)
  _finite(stats)
  assert int(jax.device_get(state["step"])) == STEPS
  assert host_reads == ([B] * STEPS if reward == "host" else [])
