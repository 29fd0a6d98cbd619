"""Supervised fine-tuning on the synthetic testbed's corpus (or local JSONL files).

    python -m experiments.launch --config=configs/sft.py
    python -m experiments.launch --config=configs/sft.py:runlocal
    python -m experiments.launch --config=configs/sft.py \
      --config.data.source=jsonl --config.data.train_jsonl=data/sft.jsonl

The default trains a small Llama-style model on the testbed's review language
(about 7 minutes on 2 CPU cores: the reward model's trunk is this model, and a
longer-trained trunk is what brings the reward model near the noise ceiling; see
BUILD_NOTES.md); `:runlocal` is the smoke-test size (about 25 s).
Every testbed knob is under `config.data.testbed` (language, gold, panel).
"""

import ml_collections

from configs import common
from rlhf_jax import exporters
from rlhf_jax.data.testbed import config as testbed_config


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, seed=0)
  config = ml_collections.ConfigDict()
  config.trainer = "sft"
  config.seed = arg.seed
  # Packed rows of ~1.66 examples: ~2.3 epochs of 32000 examples. 2200 steps (3.6 epochs)
  # reached the same eval loss over 3 seeds (0.744-0.747 against 0.744; BUILD_NOTES.md).
  config.total_steps = 1400
  config.batch_size = 32
  config.max_len = 64  # BOS + prompt + response + EOS, right-padded

  # Data
  config.data = ml_collections.ConfigDict()
  config.data.source = "testbed"  # "testbed" | "jsonl"
  config.data.num_train = 32000  # testbed examples
  config.data.num_eval = 256
  config.data.seed = 0
  config.data.testbed = testbed_config.default_config()
  # With source="jsonl": per line {"prompt", "response"} or a chat {"messages": [{"role":
  # "system" | "user" | "assistant", "content"}, ...]}; a file may mix both.
  config.data.train_jsonl = ""
  config.data.eval_jsonl = ""
  config.data.skip_invalid = False  # True: skip and count malformed lines
  config.data.data_dir = ""  # built array_record datasets; default <workdir>/data/tfds
  # Which tokens carry the loss: "assistant" (every assistant turn and its EOS; a
  # prompt/response record's response), "last" (the last assistant turn), "all" (every
  # token after BOS, prompts and user turns too).
  config.data.train_on = "assistant"
  # True: pack several examples into each max_len row (attention and positions stay per
  # example; same loss per example). A step then holds more examples, so fewer
  # total_steps cover an epoch; data_info.json's "packing" says how many per row. On the
  # testbed, 1.66 examples per row: the same epochs in 61% of the steps, and the same eval
  # loss (0.744 after 2200 packed steps, 0.739-0.746 after 3600 unpacked; BUILD_NOTES).
  # runlocal stays unpacked, the row-per-example layout the small tests check.
  config.data.packing = not arg.runlocal

  # Start from a finished policy stage or a Hugging Face model ("hf:DIR"): its model,
  # weights and tokenizer are used and the tokenizer and model sections below ignored,
  # except that a Hugging Face model takes the model section's dtype, param_dtype
  # ("bfloat16" halves its memory), remat, scan_layers (True for a deep model: one
  # compiled block instead of one per layer) and attention_impl.
  config.policy_init = ""

  # Tokenizer: trained on the training texts unless a SentencePiece .model path is given
  # (one without a PAD piece, as Llama 2's, pads with the id past its pieces).
  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.path = ""
  config.tokenizer.vocab_size = 512
  config.tokenizer.model_type = "unigram"

  # Model: a preset from rlhf_jax/models/config.py plus any ModelConfig field.
  config.model = ml_collections.ConfigDict()
  config.model.preset = "tiny"
  config.model.d_model = 128
  config.model.num_layers = 3
  config.model.num_heads = 4
  config.model.num_kv_heads = 2
  config.model.mlp_dim = 384
  config.model.dtype = "float32"
  config.model.param_dtype = "float32"  # "bfloat16": parameters stored in bfloat16
  # Attention kernel: "xla" (einsums), "fused" (jax.nn.dot_product_attention: cuDNN flash
  # attention on a GPU in bfloat16) or "auto" (fused where cuDNN takes the case, else xla).
  # A Hugging Face model (policy_init) takes it too.
  config.model.attention_impl = "xla"
  config.model.remat = "none"
  # Layers unrolled: at 3 layers a training step is ~20% faster on CPU than under
  # lax.scan (whose loop copies each layer's slice in and out) and compiles no slower. A
  # deep model (e.g. an imported one) compiles one block with scan_layers=True.
  config.model.scan_layers = False

  # Low-rank adapters (LoRA): rank > 0 trains only them (configs/common.py).
  config.lora = common.lora_section()

  # Optimizer (fields of rlhf_jax/optim.py:default_config)
  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adamw"
  config.optim.lr = 3e-3
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 30
  config.optim.final_lr_fraction = 0.1
  config.optim.weight_decay = 0.01
  config.optim.grad_clip_norm = 1.0
  config.optim.grad_accum_steps = 1

  # Mesh and sharding
  config.mesh = (1, -1, 1)  # (data, fsdp, tensor)
  config.sharding_rules = "fsdp"  # dp | fsdp | fsdp_tp

  # Logging, evals, checkpoints
  config.log_every = 20
  config.eval_every = 350
  config.checkpoint_every = 350
  config.keep_checkpoints = 3
  config.eval = ml_collections.ConfigDict()
  config.eval.num_samples = 32
  config.eval.temperature = 1.0
  config.eval.max_new_tokens = 40
  config.eval.prompt_len = 18

  # Metric exporters, all off by default (rlhf_jax/exporters, docs/exporters.md):
  # Prometheus, Weights & Biases, DogStatsD.
  config.exporters = exporters.exporters_section()

  if arg.runlocal:
    config.total_steps = 120
    config.batch_size = 16
    config.data.num_train = 2000
    config.data.num_eval = 64
    config.tokenizer.vocab_size = 320
    config.model.d_model = 64
    config.model.num_layers = 2
    config.model.mlp_dim = 192
    config.optim.warmup_steps = 10
    config.log_every = 10
    config.eval_every = 60
    config.checkpoint_every = 60
    config.eval.num_samples = 16
  return config
