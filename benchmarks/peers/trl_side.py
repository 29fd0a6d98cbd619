"""The PyTorch peers' side of the peer benchmark (its own environment; see run.sh):
`python benchmarks/peers/trl_side.py --task=NAME`.

  dpo         TRL's `DPOTrainer`, reference log-probs precomputed (`precompute_ref_log_probs`);
  grpo        TRL's `GRPOTrainer`, a reference for the KL term (beta 0.04), one iteration;
  train_step  a Hugging Face `LlamaForCausalLM` trained eagerly with `torch.optim.AdamW`;
  decode      `generate` with sampling and the KV cache, exactly 32 new tokens.

The model is a `LlamaForCausalLM` at the shape of `shape.py` in float32 on the CPU, with a
word-level tokenizer of `shape.VOCAB` ids (`w3` ... `w315`). Trainer steps are timed by a
callback; the first two (warm-up) are left out.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import shape
import torch
import transformers

WARMUP = 2


def tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"<pad>": shape.PAD, "<s>": shape.BOS, "</s>": shape.EOS}
  vocab.update({f"w{i}": i for i in range(3, shape.VOCAB)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
  )


def model(seed: int = 0):
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
    vocab_size=shape.VOCAB, hidden_size=shape.WIDTH, intermediate_size=shape.MLP,
    num_hidden_layers=shape.LAYERS, num_attention_heads=shape.HEADS,
    num_key_value_heads=shape.HEADS, head_dim=shape.HEAD_DIM, rope_theta=shape.ROPE_THETA,
    rms_norm_eps=shape.NORM_EPS, tie_word_embeddings=False, pad_token_id=shape.PAD,
    bos_token_id=shape.BOS, eos_token_id=shape.EOS, max_position_embeddings=512,
  )  # fmt: skip
  return transformers.LlamaForCausalLM(config).to(torch.float32)


def words(rng, rows: int, length: int) -> list[str]:
  return [" ".join(f"w{i}" for i in row) for row in rng.integers(3, shape.VOCAB, (rows, length))]


class StepTimes(transformers.TrainerCallback):
  def __init__(self):
    self.times: list[float] = []
    self._start = 0.0

  def on_step_begin(self, args, state, control, **kwargs):
    self._start = time.perf_counter()

  def on_step_end(self, args, state, control, **kwargs):
    self.times.append(time.perf_counter() - self._start)


def median_after_warmup(times: list[float]) -> float:
  measured = sorted(times[WARMUP:])
  if not measured:
    raise SystemExit(f"only {len(times)} steps ran, fewer than {WARMUP + 1}")
  return measured[len(measured) // 2]


def common_args(steps: int, out: str) -> dict:
  return dict(
    output_dir=out, max_steps=steps, learning_rate=shape.LR, lr_scheduler_type="constant",
    optim="adamw_torch", weight_decay=0.0, logging_steps=10**6, save_strategy="no",
    report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    # TRL's defaults are bfloat16 autocast (a slow path of CPU matmuls) and gradient
    # checkpointing; the shape here is float32 without recomputation on both sides.
    bf16=False, gradient_checkpointing=False,
  )  # fmt: skip


def dpo(repeats: int, out: str) -> float:
  import datasets
  from trl import DPOConfig, DPOTrainer

  steps = WARMUP + repeats
  rng = np.random.default_rng(0)
  rows = shape.DPO_PAIRS * steps
  half = shape.DPO_LEN // 2
  data = datasets.Dataset.from_dict(
    dict(
      prompt=words(rng, rows, half),
      chosen=[" " + w for w in words(rng, rows, half - 1)],  # + EOS: 32 tokens
      rejected=[" " + w for w in words(rng, rows, half - 1)],
    )
  )
  args = DPOConfig(
    **common_args(steps, out), per_device_train_batch_size=shape.DPO_PAIRS,
    max_length=shape.DPO_LEN, precompute_ref_log_probs=True, beta=0.1, loss_type=["sigmoid"],
  )  # fmt: skip
  timer = StepTimes()
  trainer = DPOTrainer(
    model=model(), args=args, train_dataset=data, processing_class=tokenizer(), callbacks=[timer]
  )
  trainer.train()
  return median_after_warmup(timer.times)


def grpo(repeats: int, out: str) -> float:
  import datasets
  from trl import GRPOConfig, GRPOTrainer

  steps = WARMUP + repeats
  rng = np.random.default_rng(0)
  data = datasets.Dataset.from_dict(
    dict(prompt=words(rng, shape.GRPO_PROMPTS * steps, shape.PROMPT_LEN - 1))
  )

  def even_share(completion_ids, **kwargs):
    """The rule reward: the share of even token ids in the completion."""
    return [sum(i % 2 == 0 for i in ids) / max(len(ids), 1) for ids in completion_ids]

  rows = shape.GRPO_PROMPTS * shape.GRPO_GROUP
  args = GRPOConfig(
    **common_args(steps, out), per_device_train_batch_size=rows,
    num_generations=shape.GRPO_GROUP, steps_per_generation=1, num_iterations=1,
    max_completion_length=shape.NEW_TOKENS, temperature=1.0, beta=0.04,
    shuffle_dataset=False, model_init_kwargs={"dtype": torch.float32},
  )  # fmt: skip
  # TRL builds the KL term's reference from the policy's path: save the policy there.
  path = os.path.join(out, "policy")
  model().save_pretrained(path)
  timer = StepTimes()
  trainer = GRPOTrainer(
    model=path, reward_funcs=[even_share], args=args, train_dataset=data,
    processing_class=tokenizer(), callbacks=[timer],
  )  # fmt: skip
  trainer.train()
  return median_after_warmup(timer.times)


def train_step(repeats: int) -> float:
  net = model()
  opt = torch.optim.AdamW(net.parameters(), lr=shape.LR, weight_decay=0.01)
  tokens = torch.randint(0, shape.VOCAB, (shape.TRAIN_BATCH, shape.TRAIN_LEN))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = net(input_ids=tokens, labels=tokens).loss
    loss.backward()
    opt.step()

  return shape.timed(step, repeats)


def decode(repeats: int) -> float:
  net = model().eval()
  prompt = torch.randint(3, shape.VOCAB, (shape.ROLLOUTS, shape.PROMPT_LEN))
  prompt[:, 0] = shape.BOS

  @torch.no_grad()
  def run():
    net.generate(
      input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
      max_new_tokens=shape.NEW_TOKENS, min_new_tokens=shape.NEW_TOKENS, use_cache=True,
      pad_token_id=shape.PAD,
    )  # fmt: skip

  return shape.timed(run, repeats)


def main() -> None:
  task, repeats = shape.parse_args()
  if task == "ppo":
    raise SystemExit("PPO's peer is Tunix (tunix_side.py)")
  transformers.logging.set_verbosity_error()
  with tempfile.TemporaryDirectory() as out:
    if task in ("dpo", "dpo_two_rows"):  # TRL has one layout: two rows a pair
      seconds = dpo(repeats, out)
    elif task == "grpo":
      seconds = grpo(repeats, out)
    elif task == "train_step":
      seconds = train_step(repeats)
    else:
      seconds = decode(repeats)
  import trl

  side = "trl" if task in ("dpo", "dpo_two_rows", "grpo") else "torch"
  shape.emit(
    side, task, seconds, torch=torch.__version__, transformers=transformers.__version__,
    trl=trl.__version__, threads=torch.get_num_threads(),
  )  # fmt: skip


if __name__ == "__main__":
  main()
