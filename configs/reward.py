"""Bradley-Terry reward model on panel-labelled pairs of SFT-policy samples.

    python -m experiments.launch --config=configs/reward.py
    python -m experiments.launch --config=configs/reward.py:runlocal
    python -m experiments.launch --config=configs/reward.py --config.policy_init=runs/sft

Without `policy_init`, the SFT stage (configs/sft.py, same size variant) is
trained first into <workdir>/sft, and reused on the next run. On the testbed,
four SFT samples are drawn per prompt and all six pairs are labelled by the
simulated panel; training takes the six comparisons of a prompt from one forward
pass over its four responses, with soft labels from the raters' stated
confidence (see BUILD_NOTES.md for the measurements behind these defaults).
With `data.source=jsonl`, `data.train_files` are JSONL/Parquet preference files
(prompt, chosen, rejected, optional rater_id, tie, margin, confidence).
"""

import ml_collections

from configs import common
from configs import sft as sft_config
from rlhf_jax import exporters
from rlhf_jax.data.testbed import config as testbed_config


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, seed=0)
  config = ml_collections.ConfigDict()
  config.trainer = "reward"
  config.seed = arg.seed
  # 3 epochs of 10667 prompts x 6 comparisons; a batch is 32 prompts' groups (128 responses).
  config.total_steps = 1000
  config.batch_size = 32  # comparison groups (prompts) per step; rows = batch_size x K
  # BOS + prompt + response + EOS; a longer row loses the prompt's generic opening first.
  config.max_len = 48

  # Upstream stage: a finished SFT workdir, or "" to train configs/sft.py into <workdir>/sft.
  config.policy_init = ""
  config.sft = sft_config.get_config("runlocal" if arg.runlocal else None)
  # Where the reward model starts: "" the SFT policy's trunk (fresh heads); or hf:DIR, a
  # Hugging Face causal LM (its trunk, fresh heads) or one-label sequence classifier (its
  # trunk and head: fine-tuning a published reward model). It must share the policy's
  # tokenizer.
  config.reward_init = ""

  # Data
  config.data = ml_collections.ConfigDict()
  config.data.source = "testbed"  # "testbed" | "jsonl"
  config.data.num_train = 64000  # labelled pairs (plus the anchor pairs every rater sees)
  config.data.num_eval = 2000
  # K: training prompts get this many SFT samples and every pair of them is labelled; the
  # trainer scores each response once for its K-1 comparisons (InstructGPT's K-wise
  # batches). With JSONL files, consecutive same-prompt records are grouped up to K
  # responses. Eval pairs are always two samples per prompt.
  config.data.responses_per_prompt = 4
  config.data.seed = 0
  config.data.testbed = testbed_config.default_config()
  config.data.temperature = 1.0  # SFT sampling for pairs
  config.data.max_new_tokens = 40
  config.data.prompt_len = 18  # BOS + the longest testbed prompt (17 tokens)
  config.data.sample_batch = 256
  config.data.train_files = ()  # with source="jsonl"
  config.data.eval_files = ()
  config.data.skip_invalid = False
  config.data.data_dir = ""

  # Model: the SFT policy's trunk, plus `extra_layers` blocks on top (initialised as the
  # identity; they let every position see the policy's next-token predictions).
  config.extra_layers = 0
  # One member: within 5 points of the noise ceiling on 3 seeds (4.0-4.8) at half the
  # training of two (BUILD_NOTES.md); more members give the spread, an uncertainty signal.
  config.ensemble_size = 1
  config.use_margin = True
  # Labels: "none" = hard (chosen wins with probability 1); "confidence" = soft targets
  # from the rater's stated confidence, confidence_range[0] -> 0.5 ... [1] -> 1.
  config.soft_labels = "confidence"
  config.confidence_range = (1.0, 5.0)
  config.center_coef = 0.01

  # Low-rank adapters (LoRA): rank > 0 trains only them (configs/common.py).
  config.lora = common.lora_section()

  # Optimizer
  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adamw"
  config.optim.lr = 1e-3
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 20
  config.optim.final_lr_fraction = 0.1
  config.optim.weight_decay = 0.01
  config.optim.grad_clip_norm = 1.0

  # Mesh and sharding
  config.mesh = (1, -1, 1)
  config.sharding_rules = "fsdp"

  # Logging, evals, checkpoints
  config.log_every = 25
  config.eval_every = 250
  config.checkpoint_every = 250
  config.keep_checkpoints = 3
  config.normalize_samples = 512  # SFT samples that set the score's mean 0, std 1
  config.eval = ml_collections.ConfigDict()
  config.eval.num_gold_samples = 256  # SFT samples on held-out prompts, scored by RM and gold

  # Metric exporters, all off by default (rlhf_jax/exporters, docs/exporters.md):
  # Prometheus, Weights & Biases, DogStatsD.
  config.exporters = exporters.exporters_section()

  if arg.runlocal:
    config.total_steps = 100
    config.batch_size = 8
    config.optim.warmup_steps = 10
    config.data.num_train = 1200
    config.data.num_eval = 128
    config.data.sample_batch = 128
    config.ensemble_size = 2
    config.log_every = 10
    config.eval_every = 50
    config.checkpoint_every = 50
    config.normalize_samples = 128
    config.eval.num_gold_samples = 64
  return config
