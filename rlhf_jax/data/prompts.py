"""Prompts for the RL stages: the testbed's, JSONL/Parquet files, or a TFDS dataset.

    prompt_set = prompts.load(config.data, config.eval.num_prompts, tokenizer, config.prompt_len)
    prompt_set.train, prompt_set.eval, prompt_set.info   # texts; counts (long ones left out)

The `data` section every RL stage shares (`SECTION_SPEC`; defaults in configs/common.py):

  source        "testbed" (default) | "jsonl" (JSONL or Parquet files, by suffix or magic
                bytes, as preference files) | "tfds" (a TFDS dataset)
  prompts       jsonl: one or more files, comma-separated. tfds: a prepared dataset's
                directory (`.../name/config/1.0.0`) or a registered name found in
                `data_dir`.
  eval_prompts  jsonl: held-out prompt files; "" holds out `num_eval` distinct prompts of
                `prompts` (seeded by `seed`; none of them is trained on).
  train_split, eval_split   tfds splits ("" for eval_split: held out as for files).
  skip_invalid  skip (and count) malformed records instead of failing on the first.
  data_dir      where TFDS finds registered datasets.
  num_prompts   testbed: how many training prompts to draw; files: at most this many
                (0: all).
  seed          testbed draws; the file hold-out.
  testbed       the testbed's knobs (its prompts' language).

Records (one per JSONL line or Parquet/TFDS row): `{"prompt": "text"}`, or
`{"messages": [{"role": "user", "content": "..."}, ...]}` ending with a user turn and
rendered in the tokenizer's chat format (its chat template, else `chat.render_prompt`'s
plain text; `chat.format_for`); exactly one of the two. Other fields are ignored. A bad
record raises `DataError` naming the file, line (Parquet: row) and field, as preference
files do; with `skip_invalid` it is skipped and counted.

Length: a prompt whose tokens (BOS + text) do not fit `prompt_len` is left out, not cut
(a prompt missing its start asks a different question), before the hold-out; the dropped
prompts are counted per split (with the file:line of the first), a warning comes when
more than 1% go, and an error naming the files when none is left.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from rlhf_jax import config_spec as cs
from rlhf_jax import errors, rng
from rlhf_jax.data import chat, preferences

SOURCES = ("testbed", "jsonl", "tfds")
DROP_WARN_FRACTION = 0.01
MAX_EXAMPLES = 3  # file:line examples of dropped prompts kept in the info


def _check_section(data, prefix: str) -> None:
  if data.source != "testbed" and not data.prompts:
    raise cs.ConfigError(
      f"{prefix}.prompts is empty but {prefix}.source={data.source!r}.",
      hint=f"Set {prefix}.prompts to a prompt file (JSONL/Parquet) or a TFDS dataset.",
    )
  if data.source == "jsonl":
    for key in ("prompts", "eval_prompts"):
      for path in split_paths(data[key]):
        if not os.path.isfile(path):
          raise cs.ConfigError(f"{prefix}.{key}: {path!r} is not a file.")
  if data.source == "testbed" and data.num_prompts < 1:
    raise cs.ConfigError(f"{prefix}.num_prompts={data.num_prompts}: the testbed needs >= 1.")


@dataclasses.dataclass(frozen=True)
class TestbedSection(cs.Check):
  """The testbed's knobs (`data.testbed`), checked only when `data.source` is one of
  `sources`: a run on one's own data never imports the testbed, whose section then stays
  as plain, unused data."""

  sources: tuple[str, ...] = ("testbed",)

  def __call__(self, value, key, parent):
    if parent is not None and parent.get("source") not in self.sources:
      return
    from rlhf_jax.data.testbed import config as testbed_config

    testbed_config.CONFIG_SPEC(value, key, parent)


SECTION_FIELDS: dict[str, cs.Check] = {
  "source": cs.Choice(*SOURCES),
  "prompts": cs.Str(),
  "eval_prompts": cs.Str(),
  "train_split": cs.Str(nonempty=True),
  "eval_split": cs.Str(),
  "skip_invalid": cs.Bool(),
  "data_dir": cs.Str(),
  "num_prompts": cs.Int(min=0),
  "seed": cs.Int(min=0),
}
SECTION_SPEC = cs.Spec({**SECTION_FIELDS, "testbed": TestbedSection()}, checks=(_check_section,))


def split_paths(value: str | Sequence[str]) -> list[str]:
  """A comma-separated string (or a sequence) of paths as a list, blanks dropped."""
  items = value.split(",") if isinstance(value, str) else list(value)
  return [p.strip() for p in items if p and p.strip()]


# ------------------------------------------------------------------------------ records


def validate_prompt(record: Any, fail, render=chat.render_prompt) -> str:
  """One prompt record (see the module docstring) as the text the policy continues; chat
  records are rendered by `render` (a chat format's `render_prompt`)."""
  if not isinstance(record, Mapping):
    got = "null" if record is None else type(record).__name__
    raise fail(f"expected an object with a field 'prompt' or 'messages', got {got}", None)
  # Absent: missing, null, or empty (a TFDS row stores a missing text or list as empty).
  present = lambda field: _present(record.get(field))
  has_prompt, has_messages = present("prompt"), present("messages")
  # (An empty "prompt" with no messages falls through to the prompt's own check below.)
  if has_prompt == has_messages and (has_prompt or "prompt" not in record):
    which = "both" if has_prompt else "neither"
    raise fail(f"needs exactly one of the fields 'prompt' and 'messages', got {which}", "prompt")
  if has_messages:
    messages = record["messages"]
    if isinstance(messages, str | bytes):  # a JSON-encoded list (how a TFDS text feature holds it)
      try:
        messages = json.loads(messages)
      except ValueError:
        raise fail(
          "field 'messages' holds text that is not a JSON list of turns", "messages"
        ) from None
    if isinstance(messages, Mapping) and {"role", "content"} <= set(messages):
      # A TFDS Sequence feature comes back as columns: {"role": [...], "content": [...]}.
      messages = [
        {"role": _text(r), "content": _text(c)}
        for r, c in zip(messages["role"], messages["content"], strict=True)
      ]
    return render(chat.validate_prompt_messages(messages, fail))
  text = _text(record["prompt"])
  if not isinstance(text, str) or not text.strip():
    got = repr(text) if isinstance(text, str) else type(text).__name__
    raise fail(f"field 'prompt' must be a non-empty string, got {got}", "prompt")
  return text


def _present(value: Any) -> bool:
  return value is not None and not (hasattr(value, "__len__") and len(value) == 0)


def _text(value: Any) -> Any:
  return value.decode("utf-8") if isinstance(value, bytes) else value


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str
  where: str  # "path:line" (or "tfds:name[split] row N", or "testbed")


def read_files(
  paths: Sequence[str], skip_invalid: bool = False, render=chat.render_prompt
) -> tuple[list[Prompt], dict]:
  """The prompts of JSONL/Parquet files in order, and per-file counts (read, skipped);
  chat records rendered by `render`."""
  out, files = [], {}
  validate = lambda record, fail: validate_prompt(record, fail, render)
  for path in paths:
    skipped: list[errors.DataError] = []
    rows = preferences.iter_preference_file(
      path, skip_invalid=skip_invalid, skipped=skipped, validate=validate
    )
    count = 0
    for line, text in rows:
      out.append(Prompt(text, f"{path}:{line}"))
      count += 1
    files[path] = {"prompts": count, "skipped": len(skipped)}
    if skipped:
      logging.warning("%s: skipped %d malformed prompts; first: %s", path, len(skipped), skipped[0])
  return out, files


def read_tfds(
  name: str, split: str, data_dir: str = "", skip_invalid: bool = False, render=chat.render_prompt
) -> tuple[list[Prompt], dict]:
  """The prompts of a TFDS split: `name` a prepared dataset directory or a registered name;
  chat records rendered by `render`."""
  import tensorflow_datasets as tfds  # only this source needs it

  where = f"tfds:{name}[{split}]"
  try:
    if os.path.isdir(name):
      builder = tfds.builder_from_directory(name)
    else:
      builder = tfds.builder(name, data_dir=data_dir or None)
    source = builder.as_data_source(split=split)
  except Exception as error:  # TFDS raises many kinds; every one means "cannot read it"
    raise errors.DataError(where, 0, f"cannot open the dataset split ({error})") from None
  out, skipped = [], 0
  for i in range(len(source)):
    fail = lambda message, field, i=i: errors.DataError(where, i + 1, message, field)
    try:
      out.append(Prompt(validate_prompt(source[i], fail, render), f"{where} row {i + 1}"))
    except errors.DataError:
      if not skip_invalid:
        raise
      skipped += 1
  return out, {where: {"prompts": len(out), "skipped": skipped}}


# --------------------------------------------------------------------------------- sets


@dataclasses.dataclass
class PromptSet:
  """Training and held-out prompt texts, and the counts (`info`, for data_info.json)."""

  train: list[str]
  eval: list[str]
  info: dict[str, Any]


def keep_fitting(
  prompts: list[Prompt], tokenizer, prompt_len: int, split: str, info: dict[str, Any]
) -> list[Prompt]:
  """The prompts whose BOS + tokens fit `prompt_len`; the rest are counted in `info`.

  Raises DataError when none is left, naming the files.
  """
  if not prompts:
    return prompts
  bos = 1 if tokenizer.bos_id >= 0 else 0
  lengths = [len(ids) + bos for ids in tokenizer.encode_batch([p.text for p in prompts])]
  kept = [p for p, n in zip(prompts, lengths, strict=True) if n <= prompt_len]
  dropped = [p.where for p, n in zip(prompts, lengths, strict=True) if n > prompt_len]
  info[f"{split}_dropped_too_long"] = len(dropped)
  info[f"{split}_dropped_examples"] = dropped[:MAX_EXAMPLES]
  if not kept:
    files = sorted({p.where.rsplit(":", 1)[0] for p in prompts})
    raise errors.DataError(
      ", ".join(files),
      0,
      f"no {split} prompt fits prompt_len={prompt_len} tokens (the shortest needs {min(lengths)})",
      hint="Raise config.prompt_len or give shorter prompts.",
    )
  if len(dropped) > DROP_WARN_FRACTION * len(prompts):
    logging.warning(
      "%d of %d %s prompts are longer than prompt_len=%d tokens and are left out (first: %s).",
      len(dropped),
      len(prompts),
      split,
      prompt_len,
      ", ".join(dropped[:MAX_EXAMPLES]),
    )
  return kept


def load(data: Any, num_eval: int, tokenizer, prompt_len: int) -> PromptSet:
  """The training and `num_eval` held-out prompts the `data` section names, each fitting
  `prompt_len` tokens (those too long are left out first and counted).

  The testbed draws `data.num_prompts` training prompts (seed `data.seed`) and `num_eval`
  held-out ones (seed `data.seed + 1`) from its own split. Files and TFDS give their
  records in order (training prompts capped at `data.num_prompts` when it is positive);
  without a held-out source, `num_eval` distinct prompts are held out at random (seed
  `data.seed`) and every copy of them leaves the training set.
  """
  info: dict[str, Any] = {"source": data.source}
  render = chat.format_for(tokenizer).render_prompt
  if data.source == "testbed":
    from rlhf_jax.data import testbed

    draw = lambda split, n, stream: testbed.prompts(
      split, n, rng.seed(data.seed, stream), data.testbed
    )
    train = [Prompt(t, "testbed") for t in draw("train", data.num_prompts, "train_prompts")]
    evals = [Prompt(t, "testbed") for t in draw("eval", num_eval, "eval_prompts")]
  elif data.source == "jsonl":
    train, info["files"] = read_files(split_paths(data.prompts), data.skip_invalid, render)
    held = split_paths(data.eval_prompts)
    evals = None
    if held:
      evals, eval_files = read_files(held, data.skip_invalid, render)
      info["files"].update(eval_files)
  elif data.source == "tfds":
    train, info["files"] = read_tfds(
      data.prompts, data.train_split, data.data_dir, data.skip_invalid, render
    )
    evals = None
    if data.eval_split:
      evals, eval_files = read_tfds(
        data.prompts, data.eval_split, data.data_dir, data.skip_invalid, render
      )
      info["files"].update(eval_files)
  else:
    raise errors.ConfigError(f"config.data.source={data.source!r}; expected one of {SOURCES}.")
  train = keep_fitting(train, tokenizer, prompt_len, "train", info)
  if evals is None:
    train, evals = hold_out(train, num_eval, data.seed)
  else:
    evals = keep_fitting(evals, tokenizer, prompt_len, "eval", info)[:num_eval]
  if data.source != "testbed" and data.num_prompts:
    train = train[: data.num_prompts]
  if not train or not evals:
    split = "training" if not train else "held-out"
    where = ", ".join(info.get("files", {})) or str(data.prompts)
    raise errors.DataError(where, 0, f"no {split} prompts (counts: {info.get('files')})")
  info["num_train"], info["num_eval"] = len(train), len(evals)
  return PromptSet([p.text for p in train], [p.text for p in evals], info)


def hold_out(prompts: list[Prompt], n: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
  """(train, eval): `n` distinct prompt texts drawn with `seed` go to eval, in file order."""
  distinct = list(dict.fromkeys(p.text for p in prompts))
  if len(distinct) <= n:
    where = prompts[0].where.rsplit(":", 1)[0] if prompts else "the prompt files"
    raise errors.DataError(
      where,
      0,
      f"{len(distinct)} distinct prompts cannot give {n} held-out prompts and a training set",
      hint="Give config.data.eval_prompts, or lower config.eval.num_prompts.",
    )
  chosen = set(random.Random(seed).sample(distinct, n))
  evals, seen = [], set()
  for p in prompts:
    if p.text in chosen and p.text not in seen:
      seen.add(p.text)
      evals.append(p)
  return [p for p in prompts if p.text not in chosen], evals


def left_pad(tokenizer, texts: Sequence[str], length: int):
  """Tokenized prompts left-padded to [B, length] (BOS first), keeping each prompt's end."""
  from rlhf_jax.data import tokenizer as tokenizer_lib

  rows = []
  for ids in tokenizer.encode_batch(list(texts)):
    row = ([tokenizer.bos_id] if tokenizer.bos_id >= 0 else []) + ids
    rows.append(row[-length:])
  return tokenizer_lib.pad_batch(rows, length, tokenizer.pad_id, "left")
