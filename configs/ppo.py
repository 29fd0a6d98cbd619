"""PPO on the testbed: SFT, reward model, then PPO with a KL penalty to the SFT policy.

    python -m experiments.launch --config=configs/ppo.py
    python -m experiments.launch --config=configs/ppo.py:runlocal
    python -m experiments.launch --config=configs/ppo.py \
      --config.policy_init=runs/sft --config.reward_init=runs/reward

Without `policy_init` / `reward_init`, the SFT stage (configs/sft.py) and the
reward stage (configs/reward.py, on that SFT policy) are trained first into
<workdir>/sft and <workdir>/reward, and reused on the next run.
"""

import ml_collections

from configs import common
from configs import reward as reward_config
from configs import sft as sft_config
from rlhf_jax import exporters, monitor
from rlhf_jax.data.testbed import config as testbed_config


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, seed=0)
  variant = "runlocal" if arg.runlocal else None
  config = ml_collections.ConfigDict()
  config.trainer = "ppo"
  config.seed = arg.seed
  config.total_steps = 60  # PPO iterations (rollout + update)

  # Upstream stages: finished workdirs, or "" to train them into <workdir>/{sft,reward}.
  config.policy_init = ""
  config.reward_init = ""
  # The KL reference, when it is not the policy started from: a finished policy stage (e.g.
  # the SFT policy, while policy_init continues an earlier RL stage); "" = policy_init.
  config.reference_init = ""
  # Continuing a finished stage of this trainer: its whole train state (policy, critic,
  # optimizer, KL controller) and prompt order from its last checkpoint, training on to
  # total_steps (which counts its steps). With schedule_steps (0 = total_steps), the
  # learning-rate schedule spans that many iterations, so a chain of stages (the feedback
  # loop's rounds) trains on one schedule. policy_init is then the chain's first policy.
  config.continue_from = ""
  config.schedule_steps = 0
  config.sft = sft_config.get_config(variant)
  config.reward = reward_config.get_config(variant)

  # Prompts (the testbed's training items; eval uses held-out items)
  config.data = common.prompt_data(num_prompts=4096, seed=3)
  config.data.testbed = testbed_config.default_config()

  # Rollouts
  config.rollout_batch_size = 64
  config.prompt_len = 18  # BOS + the longest testbed prompt (17 tokens with the default
  # tokenizer); longer prompts are left out (counted in data_info.json)
  config.max_new_tokens = 40
  config.temperature = 1.0  # sampling and log-prob recomputation use the same T
  # The rollout's (old policy's) log-probs: "sampler" reads the sampler's (no extra forward
  # pass; equal up to float rounding in float32), "recompute" runs the policy again (the
  # safer choice in bfloat16, where cached decoding drifts further from a full pass).
  config.old_logprobs = "sampler"
  config.missing_eos_penalty = True
  config.missing_eos_score = -1.0

  # PPO
  config.ppo_epochs = 4
  config.minibatch_size = 16
  config.clip_eps = 0.2
  config.value_clip_eps = 0.2
  config.vf_coef = 0.1
  config.gamma = 1.0
  config.lam = 0.95
  config.whiten_rewards = False
  # Critic: "separate" (a value network initialised from the reward model) or
  # "policy_head" (a zero-initialised value head on the policy's trunk).
  config.value_model = "separate"
  # The separate critic's start: "" the reward model (member 0: trunk and head); or
  # hf:DIR, a Hugging Face causal LM (its trunk, a zero head) or one-label classifier (trunk
  # and head), sharing the policy's tokenizer.
  config.value_init = ""
  config.loss_aggregation = "token_mean"  # token_mean | sequence_mean | token_sum_norm

  # KL penalty to the reference (SFT) policy
  config.kl = ml_collections.ConfigDict()
  config.kl.estimator = "k1"  # k1 | k2 | k3, per token in the reward
  config.kl.controller = "adaptive"  # fixed | adaptive
  config.kl.init_coef = 0.05
  config.kl.target = 6.0
  config.kl.horizon = 10000.0

  # Low-rank adapters (LoRA) on the policy: rank > 0 trains only them (and a value head
  # on the policy); the reference is then the policy's own frozen base (configs/common.py).
  config.lora = common.lora_section()

  # Optimizers: policy and value network (learning rate annealed linearly to 0)
  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adam_tf"
  config.optim.lr = 3e-5
  config.optim.schedule = "linear"
  config.optim.grad_clip_norm = 1.0
  config.value_optim = ml_collections.ConfigDict()
  config.value_optim.name = "adam_tf"
  config.value_optim.lr = 1e-4
  config.value_optim.schedule = "linear"
  config.value_optim.grad_clip_norm = 1.0

  # Mesh and sharding
  config.mesh = (1, -1, 1)
  config.sharding_rules = "fsdp"

  # Logging, evals, checkpoints
  config.log_every = 5
  config.eval_every = 20
  config.checkpoint_every = 20
  config.keep_checkpoints = 3
  config.eval = common.eval_section(num_prompts=128)

  # Reward-hacking and drift detectors at every eval, and the alert rules over them
  # (rlhf_jax/monitor, docs/monitoring.md): alerts.jsonl, the best policy in <workdir>/best.
  config.monitor = monitor.monitor_section()

  # Metric exporters, all off by default (rlhf_jax/exporters, docs/exporters.md):
  # Prometheus, Weights & Biases, DogStatsD.
  config.exporters = exporters.exporters_section()

  if arg.runlocal:
    # A small policy and few iterations: a larger step size than the full run's.
    config.total_steps = 20
    config.optim.lr = 1e-3
    config.rollout_batch_size = 32
    config.minibatch_size = 16
    config.ppo_epochs = 2
    config.data.num_prompts = 512
    config.log_every = 2
    config.eval_every = 10
    config.checkpoint_every = 10
    config.eval.num_prompts = 64
  return config
