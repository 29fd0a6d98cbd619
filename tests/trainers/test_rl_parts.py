"""PPO's and GRPO's jitted pieces, module-level functions tested on a tiny model and small arrays.

No trained stage: the policy, critic and reward are freshly initialised tiny networks, and
a "sample" is a fixed set of response tokens. What each piece must do:
  - make_experience: zero KL when the policy is the reference; rewards land at the last
    response token; advantages are whitened; GRPO's baseline is per group;
  - the losses: at the rollout's own params the ratio is 1 (no clipping, no KL);
  - update: one iteration moves the params, counts the step, and runs every minibatch of
    every epoch (the permutations cover each row once per epoch).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import models
from rlhf_jax.rl import kl as kl_lib
from rlhf_jax.rl import sampler
from rlhf_jax.rl.sampler import SampleOutput
from rlhf_jax.trainers import grpo, ppo, rl_common

B, P, N = 8, 4, 5  # rows, prompt length, response length


def _config():
  return models.get_model_config("tiny", vocab_size=32, d_model=32, num_layers=1, mlp_dim=64)


@pytest.fixture(scope="module")
def tiny():
  cfg = _config()
  lm = models.LanguageModel(cfg)
  critic = models.ScalarModel(cfg, head_init="zeros")
  unbox = lambda p: jax.tree.map(
    lambda x: getattr(x, "value", x), p, is_leaf=lambda x: hasattr(x, "value")
  )
  lm_params = unbox(models.init_params(lm, jax.random.key(0)))
  critic_params = unbox(models.init_params(critic, jax.random.key(1)))
  prompt, pmask, sample = fixed_rollout(vocab=32)
  return dict(lm=lm, critic=critic, lm_params=lm_params, critic_params=critic_params,
              prompt=prompt, pmask=pmask, sample=sample, rmask=sample.response_mask)  # fmt: skip


def fixed_rollout(vocab: int):
  """B prompts (two left-padded) and a fixed "sample" of responses of lengths 1 to N."""
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(3, vocab, (B, P)), jnp.int32)
  pmask = jnp.ones((B, P), bool).at[:2, 0].set(False)
  tokens = jnp.asarray(rng.integers(3, vocab, (B, N)), jnp.int32)
  lengths = jnp.asarray([5, 3, 5, 1, 4, 5, 2, 5], jnp.int32)
  rmask = jnp.arange(N)[None, :] < lengths[:, None]
  sample = SampleOutput(
    tokens=jnp.where(rmask, tokens, 0),
    logprobs=jnp.zeros((B, N)),
    sample_logprobs=jnp.zeros((B, N)),
    response_mask=rmask,
    lengths=lengths,
    has_eos=lengths < N,
  )
  return prompt, pmask, sample


def _ppo_settings(**changes):
  values = dict(
    prompt_len=P, max_new_tokens=N, temperature=1.0, kl_estimator="k1", missing_eos_score=None,
    whiten_rewards=False, gamma=1.0, lam=0.95, clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.1,
    loss_aggregation="token_mean", epochs=2, minibatch_size=4, rollout_batch_size=B,
    kl_controller="fixed", kl_target=6.0, kl_horizon=10000.0,
  )  # fmt: skip
  return ppo.Settings(**{**values, **changes})


def _score(full, fmask, rmask):
  """A fake reward model: the number of response tokens above 16."""
  return jnp.sum((full[:, P:] > 16) * rmask, axis=-1).astype(jnp.float32)


def _ppo_state(t, s):
  nets = ppo.Networks(t["lm"], t["critic"], t["lm"])
  tx = optax.sgd(1e-2)
  state = ppo.init_state(t["lm_params"], t["critic_params"], jax.random.key(3),
                         policy_tx=tx, value_tx=tx, kl_coef=0.1)  # fmt: skip
  return nets, tx, state


def test_ppo_experience_at_the_reference(tiny):
  s = _ppo_settings(lam=1.0)
  nets, _, state = _ppo_state(tiny, s)
  exp, stats = ppo.make_experience(
    state, tiny["lm_params"], tiny["prompt"], tiny["pmask"], tiny["sample"],
    nets=nets, rm_score=_score, s=s,
  )  # fmt: skip
  rmask = tiny["rmask"]
  assert float(stats["objective/kl"]) == pytest.approx(0.0, abs=1e-6)  # policy == reference
  assert float(stats["objective/rm_scores"]) == pytest.approx(
    float(jnp.mean(_score(exp["full"], None, rmask)))
  )
  assert exp["advantages"].shape == (B, N) and exp["returns"].shape == (B, N)
  adv = np.asarray(exp["advantages"])[np.asarray(rmask)]
  assert abs(adv.mean()) < 1e-5 and adv.std() == pytest.approx(1.0, rel=1e-3)  # whitened
  # The critic starts at zero (zero head) and the KL is zero, so with gamma = lam = 1 the
  # return of every token is the score: the reward sits at the last response token.
  returns = np.asarray(exp["returns"])
  scores = np.asarray(_score(exp["full"], None, rmask))
  for row in range(B):
    n = int(tiny["sample"].lengths[row])
    np.testing.assert_allclose(returns[row, :n], scores[row], atol=1e-4)


def test_ppo_loss_at_the_rollout_params_has_ratio_one(tiny):
  s = _ppo_settings()
  nets, _, state = _ppo_state(tiny, s)
  exp, _ = ppo.make_experience(state, tiny["lm_params"], tiny["prompt"], tiny["pmask"],
                               tiny["sample"], nets=nets, rm_score=_score, s=s)  # fmt: skip
  _, stats = ppo.minibatch_loss(state["policy"], state["value"], exp, nets=nets, s=s)
  assert float(stats["policy/clipfrac"]) == 0.0
  assert float(stats["policy/approxkl"]) == pytest.approx(0.0, abs=1e-7)


def test_ppo_update_moves_params_and_steps_the_controller(tiny):
  s = _ppo_settings(kl_controller="adaptive")
  nets, tx, state = _ppo_state(tiny, s)
  exp, _ = ppo.make_experience(state, tiny["lm_params"], tiny["prompt"], tiny["pmask"],
                                   tiny["sample"], nets=nets, rm_score=_score, s=s)  # fmt: skip
  update = functools.partial(ppo.update, nets=nets, policy_tx=tx, value_tx=tx,
                             lr_schedule=lambda count: 1e-2, s=s)  # fmt: skip
  new, upd = jax.jit(update)(state, exp, jnp.asarray(0.0))
  assert int(new["step"]) == 1
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new["policy"], state["policy"])
  assert max(jax.tree.leaves(moved)) > 0
  assert float(upd["lr"]) == pytest.approx(1e-2)
  # KL 0 is below the target: the adaptive controller lowers the coefficient.
  assert float(new["kl"].kl_coef) < 0.1
  assert not np.array_equal(jax.random.key_data(new["rng"]), jax.random.key_data(state["rng"]))


def test_policy_head_network_starts_with_a_zero_value_head(tiny):
  class Stage:  # what `networks` reads of a finished stage
    module, params = tiny["lm"], tiny["lm_params"]
    shardings = jax.tree.map(lambda _: None, tiny["lm_params"])

  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
  nets, (policy, _), (value, _) = ppo.networks(Stage, None, "policy_head", mesh, "fsdp")
  assert nets.value is None and nets.policy.value_head and value == {}
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(policy["value"]))
  assert ppo.lm_params(policy).keys() == tiny["lm_params"].keys()


def _grpo_settings(**changes):
  values = dict(
    prompt_len=P, max_new_tokens=N, temperature=1.0, group_size=4, advantage="grpo",
    scale_rewards=True, missing_eos_score=None, kl_in_loss=True, kl_estimator="k3",
    kl_coef=0.1, clip_eps=0.2, loss_aggregation="token_mean", epochs=1, minibatch_size=4,
    rollout_batch_size=B,
  )  # fmt: skip
  return grpo.Settings(**{**values, **changes})


def _grpo_experience(t, state, host, s):
  return grpo.make_experience(
    state, t["lm_params"], t["prompt"], t["pmask"], t["sample"], host,
    module=t["lm"], rm_score=None, s=s,
  )  # fmt: skip


def test_grpo_experience_uses_group_baselines_and_host_scores(tiny):
  s = _grpo_settings()
  state = grpo.init_state(tiny["lm_params"], jax.random.key(0), tx=optax.sgd(1e-2))
  host = jnp.asarray([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 8.0])
  exp, stats = _grpo_experience(tiny, state, host, s)
  adv = np.asarray(exp["advantages"])[:, 0]  # the sequence advantage on the first token
  # Each group of 4 is centred on its own mean.
  assert adv[:4].sum() == pytest.approx(0.0, abs=1e-5) and adv[4:].sum() == pytest.approx(
    0.0, abs=1e-5
  )
  assert adv[3] > adv[0] and adv[7] > adv[4]
  assert float(stats["objective/kl"]) == pytest.approx(0.0, abs=1e-6)
  assert float(stats["reward"]) == pytest.approx(float(host.mean()))
  # At the rollout's params: ratio 1, and the k3 KL term is zero.
  _, loss_stats = grpo.minibatch_loss(state["policy"], exp, module=tiny["lm"], s=s)
  assert float(loss_stats["loss/kl"]) == pytest.approx(0.0, abs=1e-6)
  assert float(loss_stats["policy/clipfrac"]) == 0.0


def test_grpo_update_moves_params_and_counts_the_step(tiny):
  s = _grpo_settings(epochs=2)
  tx = optax.sgd(1e-1)
  state = grpo.init_state(tiny["lm_params"], jax.random.key(0), tx=tx)
  host = jnp.asarray([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 8.0])
  exp, _ = _grpo_experience(tiny, state, host, s)
  update = functools.partial(grpo.update, module=tiny["lm"], tx=tx, lr_schedule=lambda c: 0.1, s=s)
  new, stats = jax.jit(update)(state, exp)
  assert int(new["step"]) == 1 and float(stats["grad_norm"]) > 0
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new["policy"], state["policy"])
  assert max(jax.tree.leaves(moved)) > 0
  # The update raised the log-probs of the responses with positive advantages.
  logps = grpo.logps_fn(tiny["lm"], s)
  before = logps(state["policy"], exp["full"], exp["fmask"], exp["response"])[0]
  after = logps(new["policy"], exp["full"], exp["fmask"], exp["response"])[0]
  gain = np.asarray(jnp.sum((after - before) * exp["rmask"], axis=-1))
  adv = np.asarray(exp["advantages"][:, 0])
  assert gain[adv > 0].mean() > gain[adv < 0].mean()


def test_scan_minibatches_visits_every_row_once_per_epoch():
  rows = jnp.arange(12.0)

  def step(carry, mb):
    return carry + jnp.sum(mb["x"]), {"size": jnp.asarray(mb["x"].shape[0], jnp.float32)}

  total, stats = rl_common.scan_minibatches(
    step, jnp.asarray(0.0), {"x": rows}, jax.random.key(0), epochs=3, minibatch_size=4
  )
  assert float(total) == 3 * float(rows.sum()) and float(stats["size"]) == 4.0


def test_kl_controller_state_is_a_pytree():
  # The update donates and re-shards the state: the controller must stay a pytree of arrays.
  leaves = jax.tree.leaves(kl_lib.init_kl_controller(0.1))
  assert leaves and all(isinstance(x, jax.Array) for x in leaves)


def _real_sample(t, temperature):
  """A rollout the sampler drew from the tiny policy, with its log-probs: the first key's
  whose responses are not all of full length (padding after an EOS is covered)."""
  config = sampler.SamplerConfig(max_new_tokens=N, eos_id=2, pad_id=0, temperature=temperature)
  fn = sampler.make_sampler(t["lm"], config)
  for seed in range(50):
    sample = fn(t["lm_params"], t["prompt"], t["pmask"], jax.random.key(seed))
    if not np.asarray(sample.response_mask).all():
      return sample
  raise AssertionError("no EOS in 50 rollouts")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_samplers_log_probs_stand_in_for_the_recomputed_ones(tiny, temperature):
  """old_logprobs="sampler": the experience equals the recomputed one up to float rounding,
  for PPO (separate critic and value head) and GRPO."""
  sample = _real_sample(tiny, temperature)
  rmask = np.asarray(sample.response_mask)
  assert rmask.any() and not rmask.all()
  for value_head in (False, True):
    s = _ppo_settings(temperature=temperature)
    nets, _, state = _ppo_state(tiny, s)
    if value_head:  # the policy's forward runs anyway (for the values)

      class Stage:  # what `networks` reads of a finished stage
        module, params = tiny["lm"], tiny["lm_params"]
        shardings = jax.tree.map(lambda _: None, tiny["lm_params"])

      mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
      nets, (policy, _), (value, _) = ppo.networks(Stage, None, "policy_head", mesh, "fsdp")
      state = {**state, "policy": policy, "value": value}
    got = {}
    for mode in rl_common.OLD_LOGPROBS:
      got[mode] = ppo.make_experience(
        state, tiny["lm_params"], tiny["prompt"], tiny["pmask"], sample,
        nets=nets, rm_score=_score, s=dataclasses.replace(s, old_logprobs=mode),
      )  # fmt: skip
    (exp_s, stats_s), (exp_r, stats_r) = got["sampler"], got["recompute"]
    np.testing.assert_allclose(exp_s["old_logp"] * rmask, exp_r["old_logp"] * rmask, atol=2e-5)
    for key in ("advantages", "returns", "old_values"):
      np.testing.assert_allclose(exp_s[key], exp_r[key], atol=1e-4)
    assert float(stats_s["objective/kl"]) == pytest.approx(float(stats_r["objective/kl"]), abs=1e-4)
    # Without the logits the entropy is the drawn tokens' surprisal: near, not equal.
    assert float(stats_s["objective/entropy"]) > 0
  s = _grpo_settings(temperature=temperature)
  state = grpo.init_state(tiny["lm_params"], jax.random.key(0), tx=optax.sgd(1e-2))
  host = jnp.arange(B, dtype=jnp.float32)
  exps = {
    mode: grpo.make_experience(
      state, tiny["lm_params"], tiny["prompt"], tiny["pmask"], sample, host,
      module=tiny["lm"], rm_score=None, s=dataclasses.replace(s, old_logprobs=mode),
    )[0]
    for mode in rl_common.OLD_LOGPROBS
  }  # fmt: skip
  np.testing.assert_allclose(
    exps["sampler"]["old_logp"] * rmask, exps["recompute"]["old_logp"] * rmask, atol=2e-5
  )
