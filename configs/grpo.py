"""GRPO on the testbed: G samples per prompt, group-normalised rewards, no critic.

    python -m experiments.launch --config=configs/grpo.py
    python -m experiments.launch --config=configs/grpo.py:runlocal
    python -m experiments.launch --config=configs/grpo.py \
      --config.policy_init=runs/sft --config.reward_init=runs/reward
    python -m experiments.launch --config=configs/grpo.py --config.reward_fn=gold

Without `policy_init` / `reward_init`, the SFT stage (configs/sft.py) and the
reward stage (configs/reward.py, on that SFT policy) are trained first into
<workdir>/sft and <workdir>/reward, and reused on the next run. With a reward
function other than "model" the reward stage is only loaded (for the proxy
reward in evals) when `reward_init` names one.

Each iteration samples `group_size` responses to each of `prompts_per_iter`
prompts; a response's advantage is its reward against its group's (docs/rlhf_details.md,
critic-free section). configs/rloo.py is this config with the RLOO baseline.
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
  config.trainer = "grpo"
  config.seed = arg.seed
  config.total_steps = 60  # iterations (rollout + update)

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

  # Rollouts: prompts_per_iter * group_size responses per iteration
  config.prompts_per_iter = 16
  config.group_size = 4  # G samples per prompt, the group of the baseline
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

  # Rewards: "model" (the reward stage, read at the last response token), "gold" (the
  # testbed's gold reward, a verifiable reward) or "package.module:function" taking
  # (prompts: list[str], responses: list[str]) -> a float per response.
  config.reward_fn = "model"

  # Advantages: "grpo" ((r - mean) / (std + 1e-4) in each group; scale_rewards=False is
  # Dr. GRPO, r - mean) or "rloo" (r - mean of the other G - 1; scale_rewards unused).
  config.advantage = "grpo"
  config.scale_rewards = True

  # Policy update: clipped surrogate, num_epochs passes over shuffled minibatches
  config.num_epochs = 2
  config.minibatch_size = 32
  config.clip_eps = 0.2
  config.loss_aggregation = "token_mean"  # token_mean | sequence_mean | token_sum_norm

  # KL to the reference (SFT) policy, fixed coefficient
  config.kl = ml_collections.ConfigDict()
  config.kl.mode = "loss"  # "loss": + coef * KL term (GRPO); "reward": r - coef * sum_t k1_t
  # Per-token estimator of the loss term. As a loss on policy samples, k3's gradient is that
  # of KL(ref || pi) and k2's that of KL(pi || ref); k1's is zero in expectation, so k1 is
  # refused with mode="loss" (rlhf_jax/rl/grpo.py).
  config.kl.estimator = "k3"
  config.kl.coef = 0.04

  # Low-rank adapters (LoRA) on the policy: rank > 0 trains only them (and a value head
  # on the policy); the reference is then the policy's own frozen base (configs/common.py).
  config.lora = common.lora_section()

  # Optimizer (learning rate annealed linearly to 0)
  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adam_tf"
  # Tuned on the default stages with 60 iterations of 16 x 4 rollouts: 3e-5 barely moves
  # the policy (+0.45 gold, KL 0.7), 2e-4 over-optimises the proxy (KL 8, +0.5 gold),
  # 1e-4 gains about +1.0 gold at KL ~2.5 in about two minutes on 2 cores.
  config.optim.lr = 1e-4
  config.optim.schedule = "linear"
  config.optim.grad_clip_norm = 1.0

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
    config.total_steps = 12
    config.prompts_per_iter = 8
    config.group_size = 4
    config.minibatch_size = 16
    config.num_epochs = 1
    config.data.num_prompts = 512
    config.log_every = 2
    config.eval_every = 6
    config.checkpoint_every = 6
    config.eval.num_prompts = 64
  return config
