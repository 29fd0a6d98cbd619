"""Helpers shared by config files, in the style of big_vision's `configs/common.py`.

Only ml_collections and the standard library are imported here: configs must stay loadable
without JAX.

`parse_arg` turns the single string after the colon in `--config=configs/sft.py:ARG` into
typed fields, so a config file reads

  def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, seed=0, size="small")
    ...
    if arg.runlocal:
      config.total_steps = 10
"""

from __future__ import annotations

import ml_collections

_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")
_ARG_TYPES = (bool, int, float, str)


def _convert(key: str, text: str, default):
  """Converts `text` to the type of `default`, with an error naming `key`."""
  if isinstance(default, bool):  # before int: bool is a subclass of int
    if text.lower() in _TRUE_WORDS:
      return True
    if text.lower() in _FALSE_WORDS:
      return False
    raise ValueError(
      f"Config arg {key}={text!r}: expected a bool ({'/'.join(_TRUE_WORDS)} or "
      f"{'/'.join(_FALSE_WORDS)}), or the bare word {key!r} for True."
    )
  if default is None or isinstance(default, str):
    # A None default carries no type, so the value stays the string that was written.
    return text
  kind = type(default)
  try:
    return kind(text)
  except ValueError:
    raise ValueError(
      f"Config arg {key}={text!r}: expected {kind.__name__} (default {default!r})."
    ) from None


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config arg string like "runlocal,seed=3,size=small" into typed fields.

  Every key that may appear must be declared in `defaults`, whose values also give the
  types. The string is split on commas (values cannot contain commas); each piece is either
  `key=value`, converted to the type of the default, or a bare `key`, which means True and
  is allowed only for bool keys. Bools also accept `key=true/false` (yes/no, on/off, 1/0).
  An int default takes an int ("3", "1_000"), a float default any float ("3", "1e-4"), a
  str default the text as written, and a None default keeps the text as a str. When a key
  repeats, the last value wins, so a sweep can append ",seed=2" to a base arg.

  Args:
    arg: the text after the first colon of `--config=FILE:ARG`; None or "" keeps every
      default.
    **defaults: key=default for each accepted key; defaults must be bool, int, float,
      str or None.
  Returns:
    An unlocked ConfigDict with one field per key of `defaults`.
  Raises:
    ValueError: for a key not in `defaults` (the message names it and lists the known
      keys), a bare non-bool key, or a value that does not convert.
    TypeError: for a default of an unsupported type (a bug in the config file).
  """
  for key, default in defaults.items():
    if default is not None and not isinstance(default, _ARG_TYPES):
      raise TypeError(
        f"parse_arg default {key}={default!r} has type {type(default).__name__}; "
        "use bool, int, float, str or None."
      )
  # type_safe=False: a None default may be replaced by a str.
  result = ml_collections.ConfigDict(dict(defaults), type_safe=False)
  for piece in (arg or "").split(","):
    piece = piece.strip()
    if not piece:
      continue
    key, has_value, text = piece.partition("=")
    key = key.strip()
    if key not in defaults:
      known = ", ".join(sorted(defaults)) or "(none: this config takes no arg)"
      raise ValueError(f"Unknown config arg {key!r} in {arg!r}; known keys: {known}.")
    default = defaults[key]
    if has_value:
      result[key] = _convert(key, text.strip(), default)
    elif isinstance(default, bool):
      result[key] = True
    else:
      raise ValueError(
        f"Config arg {key!r} needs a value ({key}=...): only bool keys may appear bare."
      )
  return result


def prompt_data(num_prompts: int = 4096, seed: int = 3) -> ml_collections.ConfigDict:
  """The `data` section of the RL stages: where prompts come from (rlhf_jax/data/prompts.py).

  The testbed by default; with one's own prompts,
  `--config.data.source=jsonl --config.data.prompts=prompts.jsonl` (JSONL or Parquet, each
  record {"prompt": text} or {"messages": [...]}), and `eval_prompts` for a held-out file
  (else `eval.num_prompts` distinct prompts are held out). The config file adds `testbed`.
  """
  return ml_collections.ConfigDict(
    {
      "source": "testbed",  # testbed | jsonl (JSONL or Parquet files) | tfds
      "prompts": "",  # files, comma-separated; or a TFDS dataset (name or prepared directory)
      "eval_prompts": "",  # held-out prompt files; "" = hold out eval.num_prompts of `prompts`
      "train_split": "train",  # TFDS splits
      "eval_split": "",
      "skip_invalid": False,  # skip (and count) malformed records instead of failing
      "data_dir": "",  # where TFDS finds registered datasets
      "num_prompts": num_prompts,  # testbed: training prompts drawn; files: cap (0 = all)
      "seed": seed,
    }
  )


def eval_section(num_prompts: int = 128) -> ml_collections.ConfigDict:
  """The held-out evaluation every RL stage runs (rlhf_jax/evaluation.py).

  `judge`: "auto" (the testbed's gold reward on testbed prompts, else the proxy reward
  model), "gold", "proxy", "rm:DIR" (a judge reward model, a finished reward stage) or
  "package.module:function".
  """
  return ml_collections.ConfigDict({"num_prompts": num_prompts, "judge": "auto"})


def lora_section() -> ml_collections.ConfigDict:
  """Low-rank adapters on the model this stage trains (rlhf_jax/models/lora.py).

  rank 0 (the default) trains every parameter. rank > 0 adds adapters of that rank to the
  `targets` projections (comma-separated among q, k, v, o, up, gate, down) of the starting
  model; only they train (no gradient updates or optimizer state for the rest), each
  scaled by alpha / rank, with dropout on their input. The stage exports the adapters
  merged into the weights.
  """
  return ml_collections.ConfigDict(
    {"rank": 0, "alpha": 16.0, "dropout": 0.0, "targets": "q,k,v,o,up,gate,down"}
  )
