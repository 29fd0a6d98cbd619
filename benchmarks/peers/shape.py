"""The shape and the tasks every side of the peer benchmark runs (no imports beyond the
standard library: the peers' environments load this file too).

One Llama-style model: 4 layers, width 256, 4 heads of 64 (no grouping), SwiGLU MLP of
1024, vocabulary 316, RoPE, RMSNorm, untied embeddings, float32 throughout, one CPU device.
A value or reward model is the same trunk with a scalar head.
"""

from __future__ import annotations

import json
import sys
import time

LAYERS, WIDTH, HEADS, HEAD_DIM, MLP, VOCAB = 4, 256, 4, 64, 1024, 316
ROPE_THETA, NORM_EPS = 10_000.0, 1e-5
PAD, BOS, EOS = 0, 1, 2
LR = 1e-5

# task: (what one repetition times, the figure's unit, what the figure is)
TASKS = {
  "ppo": "one PPO iteration: 64 rollouts of a 32-token prompt + 32 new tokens, sampled, scored "
  "by a reward model, valued by a separate critic, against a reference; one epoch, one "
  "minibatch of 64, Adam on policy and critic",
  "dpo": "one DPO optimizer step on 32 pairs (a 32-token prompt, two 32-token responses), "
  "the reference's log-probs precomputed, Adam; this project reads each prompt once "
  "(its default, `prefix_sharing`), TRL runs two 64-token rows a pair",
  "dpo_two_rows": "the same DPO step with two 64-token rows a pair on both sides "
  "(`config.prefix_sharing=False` here)",
  "grpo": "one GRPO iteration: 16 prompts x 4 samples (32 + 32 tokens), rule reward, group "
  "baseline, one update, Adam",
  "train_step": "one AdamW next-token step on 64 x 64 tokens",
  "decode": "sampling 32 new tokens for 64 prompts of 32 tokens, KV cache",
}
UNITS = {
  "ppo": "samples/s",
  "dpo": "steps/s",
  "dpo_two_rows": "steps/s",
  "grpo": "s/iteration",
  "train_step": "GFLOP/s",
  "decode": "GFLOP/s",
}
ROLLOUTS, PROMPT_LEN, NEW_TOKENS = 64, 32, 32
DPO_PAIRS, DPO_LEN = 32, 64
GRPO_PROMPTS, GRPO_GROUP = 16, 4
TRAIN_BATCH, TRAIN_LEN = 64, 64


def num_params(embeddings: bool = False) -> int:
  """Parameters of the policy, without the two embedding tables unless asked."""
  attn = 4 * WIDTH * HEADS * HEAD_DIM
  block = attn + 3 * WIDTH * MLP + 2 * WIDTH
  return LAYERS * block + WIDTH + (2 * VOCAB * WIDTH if embeddings else 0)


def train_flops(tokens: int) -> float:
  """6 N per token plus attention (12 L T d per token at causal length T), as in PaLM."""
  n = num_params() + VOCAB * WIDTH  # the unembedding is a matmul; the lookup is not
  return tokens * (6.0 * n + 12.0 * LAYERS * TRAIN_LEN * WIDTH / 2)


def decode_flops(rows: int, prompt: int, new: int) -> float:
  """2 N per token of the prompt and the new ones, plus attention over the cache."""
  n = num_params() + VOCAB * WIDTH
  total = rows * (prompt + new) * 2.0 * n
  for t in range(prompt, prompt + new):
    total += rows * 4.0 * LAYERS * WIDTH * t
  return total


def timed(fn, repeats: int, warmup: int = 2) -> float:
  """Median seconds of `fn()` (which must block until its work is done) after warm-up calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  times.sort()
  return times[len(times) // 2]


def figure(task: str, seconds: float) -> float:
  """The task's figure in its unit from the median seconds of one repetition."""
  if task == "ppo":
    return ROLLOUTS / seconds
  if task in ("dpo", "dpo_two_rows"):
    return 1.0 / seconds
  if task == "grpo":
    return seconds
  if task == "train_step":
    return train_flops(TRAIN_BATCH * TRAIN_LEN) / seconds / 1e9
  return decode_flops(ROLLOUTS, PROMPT_LEN, NEW_TOKENS) / seconds / 1e9


def emit(side: str, task: str, seconds: float, **extra) -> None:
  """Prints the one JSON line a side's run returns."""
  line = dict(side=side, task=task, seconds=seconds, value=figure(task, seconds))
  print(json.dumps({**line, "unit": UNITS[task], **extra}), flush=True)


def parse_args(argv: list[str] | None = None) -> tuple[str, int]:
  """`--task=NAME [--repeats=N]` of a side's script."""
  args = dict(a.lstrip("-").split("=", 1) for a in (argv or sys.argv[1:]))
  task = args.get("task", "")
  if task not in TASKS:
    raise SystemExit(f"--task must be one of {sorted(TASKS)}, not {task!r}")
  return task, int(args.get("repeats", "5"))
