"""DPO on the testbed: SFT, reward model (for its labelled pairs and the eval), then DPO.

    python -m experiments.launch --config=configs/dpo.py
    python -m experiments.launch --config=configs/dpo.py:runlocal
    python -m experiments.launch --config=configs/dpo.py \
      --config.policy_init=runs/sft --config.reward_init=runs/reward
    python -m experiments.launch --config=configs/dpo.py --config.loss_type=ipo --config.beta=0.5

Without `policy_init` / `reward_init`, the SFT stage (configs/sft.py) and the
reward stage (configs/reward.py, on that SFT policy) are trained first into
<workdir>/sft and <workdir>/reward, and reused on the next run. By default DPO
learns from the reward stage's own labelled pairs, so DPO and the reward model
(hence PPO) see the same labels; the reward model also scores the eval's
samples (`eval/proxy_reward`).
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
  config.trainer = "dpo"
  config.seed = arg.seed
  # Half an epoch of the reward stage's 64000 pairs at batch 64 (see BUILD_NOTES.md).
  config.total_steps = 500

  # Upstream stages: finished workdirs, or "" to train them into <workdir>/{sft,reward}.
  config.policy_init = ""
  config.reward_init = ""
  config.sft = sft_config.get_config(variant)
  config.reward = reward_config.get_config(variant)

  # Data: preference pairs
  config.data = ml_collections.ConfigDict()
  # "reward_stage": <reward_init>/data/pairs_{train,eval}.jsonl, the reward model's own labels;
  # "testbed": fresh panel-labelled pairs of two SFT samples per prompt (num_train, num_eval);
  # "jsonl": train_files / eval_files (JSONL or Parquet: prompt, chosen, rejected, tie, ...).
  config.data.source = "reward_stage"
  config.data.train_files = ()
  config.data.eval_files = ()
  config.data.num_train = 8000  # with source="testbed"
  config.data.num_eval = 500
  config.data.sample_batch = 256
  # With source="testbed": pairs are two SFT samples per prompt (DPO takes pairs one by one).
  config.data.responses_per_prompt = 2
  config.data.skip_invalid = False
  config.data.data_dir = ""  # built datasets; "" = <workdir>/data/tfds
  # Seeds the testbed's pair prompts and (seed + 1) the eval's held-out prompts, as in PPO.
  config.data.seed = 3
  config.data.testbed = testbed_config.default_config()
  # BOS + prompt + response + EOS, as the reward stage's rows.
  config.max_len = 48
  # One row per pair, BOS + prompt + chosen + rejected, the prompt read once (exact; see
  # rlhf_jax/rl/dpo.py); False: a chosen and a rejected row per pair.
  config.prefix_sharing = True

  # Sampling for the eval (and for testbed pairs); DPO's log-probs are at temperature 1.
  config.prompt_len = 18  # BOS + the longest testbed prompt (17 tokens with the default
  # tokenizer); longer prompts are left out (counted in data_info.json)
  config.max_new_tokens = 40
  config.temperature = 1.0

  # DPO
  config.loss_type = "sigmoid"  # sigmoid | ipo | hinge | conservative
  # Tuned on the default stages (2 epochs, lr 1e-4): beta 0.1 drifts (KL 4.8, gold +0.30, longer
  # responses without EOS); 0.3 gives gold +0.83 at KL 1.4 in under 4 minutes on 2 CPU cores.
  config.beta = 0.3
  config.label_smoothing = 0.0  # eps of loss_type="conservative"
  config.ties = "soft"  # soft: target 1/2, as the reward model | skip: weight 0
  # Labels: "none" = hard; "confidence" = soft targets from the rater's stated confidence,
  # confidence_range[0] -> 1/2 ... [1] -> 1, as the reward model's soft_labels (the
  # default: more gold at less KL than hard labels on the testbed, BUILD_NOTES.md).
  config.soft_labels = "confidence"
  config.confidence_range = (1.0, 5.0)
  config.batch_size = 64

  # Low-rank adapters (LoRA): rank > 0 trains only them (configs/common.py).
  config.lora = common.lora_section()

  # Optimizer
  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adamw"
  config.optim.lr = 1e-4
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 10
  config.optim.final_lr_fraction = 0.1
  config.optim.weight_decay = 0.0
  config.optim.grad_clip_norm = 1.0

  # Mesh and sharding
  config.mesh = (1, -1, 1)
  config.sharding_rules = "fsdp"

  # Logging, evals, checkpoints
  config.log_every = 10
  config.eval_every = 125
  config.checkpoint_every = 125
  config.keep_checkpoints = 3
  config.eval = common.eval_section(num_prompts=128)
  # Prompt files for the generation eval; "" = the testbed's held-out prompts for testbed
  # pairs, else the prompts of the eval pairs.
  config.eval.prompts = ""

  # Reward-hacking and drift detectors at every eval, and the alert rules over them
  # (rlhf_jax/monitor, docs/monitoring.md): alerts.jsonl, the best policy in <workdir>/best.
  config.monitor = monitor.monitor_section()

  # Metric exporters, all off by default (rlhf_jax/exporters, docs/exporters.md):
  # Prometheus, Weights & Biases, DogStatsD.
  config.exporters = exporters.exporters_section()

  if arg.runlocal:
    config.total_steps = 12
    config.batch_size = 16
    config.optim.warmup_steps = 2
    config.data.num_train = 256
    config.data.num_eval = 64
    config.data.sample_batch = 128
    config.log_every = 2
    config.eval_every = 6
    config.checkpoint_every = 6
    config.eval.num_prompts = 64
  return config
