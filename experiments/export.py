r"""Export a finished stage for use outside this framework.

  python -m experiments.export --workdir=W --format=hf --out=DIR [--dtype=bfloat16]

  --workdir=W   a finished stage: a policy (SFT, DPO, PPO, GRPO, RLOO) or a reward model;
                its export.json and export/ are read, as a later stage would load it.
  --format=hf   a Hugging Face model directory: config.json, model.safetensors (shards
                and an index past 4 GiB), the tokenizer files (tokenizer.json and
                tokenizer_config.json; a SentencePiece vocabulary trained here is
                converted, and its tokenizer.model kept too), and for a policy
                generation_config.json. `transformers.AutoModelForCausalLM` loads a
                policy, `AutoModelForSequenceClassification` (one label) a reward model;
                so do serving stacks with a Hugging Face runtime (vLLM, KServe).
  --dtype       the stored weights' dtype: float32 (default) or bfloat16.
  --member=K    which member of a reward-model ensemble to write (a classifier holds
                one network); needed when the ensemble has more than one.

A reward model's score is exported normalised, up to a constant the classifier cannot
hold (its score has no bias): config.json keeps it as `rlhf_jax_score_offset`, which
`reward_init=hf:DIR` reads back.

The architecture is the one the model has: GPT-2 (learned positions, LayerNorm, GELU,
biases), Llama (RoPE, RMSNorm, SwiGLU) or Qwen2 (Llama with q/k/v biases). The tokenizer
is the stage's: a Hugging Face one (a stage that started from `hf:DIR`) is copied, a
SentencePiece model (`rlhf_jax.hf.spm`) becomes a fast tokenizer that encodes to the same
ids. Errors (no finished stage, an ensemble without --member, a SentencePiece model of a
kind that does not convert) print one line and exit 2.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from rlhf_jax import errors, hf

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished stage's workdir.")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf"], "Output format.")
_OUT = flags.DEFINE_string("out", None, "The directory to write.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored weight dtype.")
_MEMBER = flags.DEFINE_integer("member", None, "The reward-model ensemble member to export.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}", exitcode=errors.EXIT_CODE)
  try:
    kind = hf.export_stage(_WORKDIR.value, _OUT.value, _DTYPE.value, _MEMBER.value)
  except (errors.Error, ValueError) as error:
    lines = error.lines() if isinstance(error, errors.Error) else [f"FATAL: {error}"]
    sys.stderr.write("\n".join(lines) + "\n")
    sys.exit(errors.EXIT_CODE)
  print(f"Wrote a Hugging Face {kind} model to {os.path.abspath(_OUT.value)}")


if __name__ == "__main__":
  app.run(main)
