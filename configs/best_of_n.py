"""Best-of-n against the reward model on the testbed: gold and proxy reward against KL.

    python -m experiments.launch --config=configs/best_of_n.py
    python -m experiments.launch --config=configs/best_of_n.py:runlocal
    python -m experiments.launch --config=configs/best_of_n.py \
      --config.policy_init=runs/sft --config.reward_init=runs/reward

Without `policy_init` / `reward_init`, the SFT and reward stages are trained
first into <workdir>/sft and <workdir>/reward (as for configs/ppo.py).
"""

import ml_collections

from configs import common
from configs import reward as reward_config
from configs import sft as sft_config
from rlhf_jax import exporters
from rlhf_jax.data.testbed import config as testbed_config


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, seed=0)
  variant = "runlocal" if arg.runlocal else None
  config = ml_collections.ConfigDict()
  config.trainer = "best_of_n"
  config.seed = arg.seed

  config.policy_init = ""
  config.reward_init = ""
  config.sft = sft_config.get_config(variant)
  config.reward = reward_config.get_config(variant)

  # Held-out prompts come from the testbed, as for every other method.
  config.data = common.prompt_data(num_prompts=4096, seed=3)  # best-of-n uses eval prompts only
  config.data.testbed = testbed_config.default_config()

  # Sampling: N samples per held-out prompt; best-of-n for every n in ns (n <= N).
  config.num_samples = 128
  config.ns = (1, 2, 4, 8, 16, 32, 64, 128)
  config.prompt_len = 18  # BOS + the longest testbed prompt (17 tokens with the default
  # tokenizer); longer prompts are left out (counted in data_info.json)
  config.max_new_tokens = 40
  config.temperature = 1.0
  config.prompts_per_chunk = 8  # prompts per sampling batch (x num_samples rows)

  config.mesh = (1, -1, 1)
  config.sharding_rules = "fsdp"
  config.eval = common.eval_section(num_prompts=128)

  # Metric exporters, all off by default (rlhf_jax/exporters, docs/exporters.md):
  # Prometheus, Weights & Biases, DogStatsD.
  config.exporters = exporters.exporters_section()

  if arg.runlocal:
    config.num_samples = 16
    config.ns = (1, 2, 4, 8, 16)
    config.eval.num_prompts = 32
  return config
