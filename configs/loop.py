"""The human-feedback loop on the testbed: R rounds of sample, select, label, gate, reward
model, policy (rlhf_jax/trainers/loop.py).

    python -m experiments.launch --config=configs/loop.py
    python -m experiments.launch --config=configs/loop.py:runlocal
    python -m experiments.launch --config=configs/loop.py --config.strategy=random \
      --config.rounds=5 --config.labels_per_round=4800

Without `policy_init`, the SFT stage (configs/sft.py) is trained first into <workdir>/sft.
Each round's labels come from the testbed's simulated rater panel; with
`--config.labeler=files` they come from people, through the labeling page
(`python -m experiments.label_server --queue=<workdir>/round_<k>/queue`): the loop stops
at a round whose queue is not labelled yet and continues when rerun.

The policy is continued round after round (PPO by default; `rl` may be GRPO or RLOO), so
the rounds together train `rounds x rl.total_steps` iterations: compare loops of different
lengths at the same product, and at the same `total_labels`.
"""

import ml_collections

from configs import common
from configs import ppo as ppo_config
from configs import reward as reward_config
from configs import sft as sft_config
from rlhf_jax.data import quality_gate
from rlhf_jax.data.testbed import config as testbed_config


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, seed=0)
  variant = "runlocal" if arg.runlocal else None
  config = ml_collections.ConfigDict()
  config.trainer = "loop"
  config.seed = arg.seed
  config.rounds = 3

  # Upstream stage: a finished SFT workdir, or "" to train configs/sft.py into <workdir>/sft.
  config.policy_init = ""
  config.sft = sft_config.get_config(variant)

  # Labels: each round buys labels_per_round pairs, within total_labels (0: no cap). The
  # testbed's anchor pairs (every rater labels each once, in round 0) come on top.
  config.labels_per_round = 8000
  config.total_labels = 24000
  # random | ensemble_disagreement | uncertainty | diverse (rlhf_jax/data/selection.py)
  config.strategy = "ensemble_disagreement"
  config.labeler = "panel"  # panel (the testbed's simulated raters) | files (people)

  # Candidates: fresh prompts each round, K samples each from the current policy; every
  # pair of a prompt's samples is a candidate.
  config.candidates = ml_collections.ConfigDict()
  config.candidates.prompts_per_round = 4000
  config.candidates.responses_per_prompt = 4
  config.candidates.temperature = 1.0
  config.candidates.max_new_tokens = 40
  config.candidates.prompt_len = 18
  config.candidates.sample_batch = 256

  # The prompt pool the rounds draw from (configs/common.py: the testbed, or prompt files).
  config.data = common.prompt_data(num_prompts=40000, seed=0)
  config.data.testbed = testbed_config.default_config()

  # Held-out pairs for the reward model's accuracy, the same every round: SFT samples
  # labelled by the panel, or preference files (`eval_files`) with labeler="files".
  config.num_eval_pairs = 2000
  config.eval_files = ()

  # The quality gate (rlhf_jax/data/quality_gate.py). On the testbed, careless raters answer
  # three times faster than the others (a median of ~7 s against ~21 s between labels).
  config.gate = quality_gate.default_config()
  config.gate.min_median_seconds = 10.0

  # The reward model of each round, on every label so far: "continue" from the last one,
  # or "retrain" from the SFT trunk.
  config.reward_mode = "continue"
  config.reward = reward_config.get_config(variant)
  config.reward.total_steps = 600
  config.reward.ensemble_size = 2  # ensemble_disagreement reads the members' spread
  config.reward.data.responses_per_prompt = 4  # same-prompt pairs share one forward pass

  # The policy stage of each round, continued from the last round's policy: "continue" goes
  # on with the last round's stage (its critic, optimizers and KL controller), all rounds on
  # one learning-rate schedule of rounds x rl.total_steps iterations, as one long run whose
  # reward model is refreshed; "restart" starts a fresh stage from the last round's policy
  # (a new critic, warm-up and schedule each round).
  config.rl_mode = "continue"
  config.rl = ppo_config.get_config(variant)
  config.rl.total_steps = 20

  config.mesh = (1, -1, 1)
  config.sharding_rules = "fsdp"

  if arg.runlocal:
    config.rounds = 2
    config.labels_per_round = 240
    config.total_labels = 0
    config.candidates.prompts_per_round = 96
    config.candidates.sample_batch = 96
    config.data.num_prompts = 1000
    config.num_eval_pairs = 128
    config.reward.total_steps = 40
    config.reward.optim.warmup_steps = 5
    config.reward.eval_every = 20
    config.reward.checkpoint_every = 20
    config.rl.total_steps = 6
    config.rl.eval_every = 6
    config.rl.checkpoint_every = 3
    config.rl.log_every = 3
  return config
