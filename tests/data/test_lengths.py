"""Tests for rlhf_jax.data.lengths: rows too long for max_len, counted per file and left out."""

import json
import logging

import numpy as np
import pytest

from rlhf_jax.data import builders, lengths, loader, testbed
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.errors import DataError


@pytest.fixture(scope="module")
def tok():
  texts = [t for e in testbed.sft_examples(200, 0) for t in (e["prompt"], e["response"])]
  return Tokenizer.train(texts, 200)


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_counts_per_file_name_the_dropped_and_keep_the_rest(tmp_path, tok, caplog):
  short = {"prompt": "Review of the lamp:", "response": "It glows."}
  long = {"prompt": "Review of the lamp:", "response": "It glows. " * 40}
  long_prompt = {"prompt": "Review of the lamp: " * 30, "response": "It glows."}
  a = _write(tmp_path / "a.jsonl", [short, long, short])
  b = _write(tmp_path / "b.jsonl", [long_prompt, short])
  source = builders.build_sft_jsonl([a, b], tmp_path / "data").source()
  with caplog.at_level(logging.WARNING):
    kept, report = lengths.check(source, lengths.sft_fit(tok, 24), what="examples", max_len=24)
  assert kept.tolist() == [0, 2, 3, 4]
  assert report["records"] == 5 and report["kept"] == 4 and report["dropped"] == 1
  assert report["files"][a] == {"records": 3, "dropped": 1, "truncated": 0}
  assert report["files"][b] == {"records": 2, "dropped": 0, "truncated": 1}
  assert report["first_dropped"][0].startswith(f"{a}:2 (needs ")
  # 1 of 5 is above the warning fraction.
  assert any("do not fit config.max_len=24" in r.getMessage() for r in caplog.records)
  # The same rows as the collate builds: the kept ones fit, the dropped one does not.
  batch = loader.sft_collate([source[i] for i in range(5)], tok, 24)
  assert (~batch["dropped"]).nonzero()[0].tolist() == kept.tolist()
  assert batch["truncated"].tolist() == [False, False, False, True, False]
  subset = lengths.Subset(source, kept)
  assert len(subset) == 4 and subset.where(1) == f"{a}:3" and subset.file_of(2) == b


def test_nothing_fits_is_an_error_naming_files_and_the_key(tmp_path, tok):
  path = _write(tmp_path / "a.jsonl", [{"prompt": "Review of the lamp:", "response": "Nice."}])
  source = builders.build_sft_jsonl([path], tmp_path / "data").source()
  with pytest.raises(DataError, match=rf"{path}: none of the 1 examples fits config.max_len=3 "):
    lengths.check(source, lengths.sft_fit(tok, 3), what="examples", max_len=3)


def test_pairs_need_both_rows_to_fit(tok):
  pairs = [
    {"prompt": "Review of the lamp:", "chosen": "It glows.", "rejected": "Bad."},
    {"prompt": "Review of the lamp:", "chosen": "It glows.", "rejected": "Bad. " * 40},
  ]
  kept, report = lengths.check(pairs, lengths.pair_fit(tok, 24), what="pairs", max_len=24)
  assert kept.tolist() == [0] and report["files"] == {
    "<pairs>": {"records": 2, "dropped": 1, "truncated": 0}
  }
  assert report["first_dropped"][0].startswith("pairs 1 (needs ")


def test_fit_rows_matches_the_rule():
  # max_len 10, BOS: the response and EOS are kept whole, the prompt keeps at least one token.
  dropped, truncated, kept = loader.fit_rows([3, 8, 0, 2], [4, 4, 8, 8], 10, 1)
  np.testing.assert_array_equal(dropped, [False, False, False, True])
  np.testing.assert_array_equal(truncated, [False, True, False, False])
  np.testing.assert_array_equal(kept, [3, 4, 0, 0])


def _chat(*turns):
  roles = {"u": "user", "a": "assistant"}
  return {"messages": [{"role": roles[r], "content": c} for r, c in turns]}


@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
def test_chat_rows_are_counted_and_measured_as_the_collate_builds_them(tmp_path, tok, train_on):
  records = [
    _chat(("u", "Review of the lamp:"), ("a", "It glows.")),
    _chat(("u", "Review of the lamp:"), ("a", "It glows. " * 40)),  # the reply overflows
    _chat(("u", "Review of the lamp: " * 10), ("a", "It glows."), ("u", "And?"), ("a", "Nice.")),
    {"prompt": "Review of the lamp:", "response": "It glows."},
  ]
  path = _write(tmp_path / "chat.jsonl", records)
  source = builders.build_sft_jsonl([path], tmp_path / "data").source()
  fit = lengths.sft_fit(tok, 40, train_on)
  fitting, reports = lengths.keep_fitting(
    {"train": source, "eval": None}, fit, what="examples", max_len=40
  )
  batch = loader.sft_collate([source[i] for i in range(4)], tok, 40, train_on=train_on)
  kept = (~batch["dropped"]).nonzero()[0]
  assert reports["train"]["kept"] == len(kept) and reports["train"]["dropped"] == 4 - len(kept)
  assert reports["train"]["truncated"] == int(batch["truncated"].sum())
  # The lengths a packer places are the rows' real lengths.
  assert fitting["train"].row_lengths.tolist() == batch["input_mask"][kept].sum(1).tolist()
  assert fitting["eval"] is None
  # Only "all" must keep the long first user turn whole (it is trained), so drops the row.
  assert batch["dropped"].tolist() == [False, True, train_on == "all", False]
  assert batch["truncated"].tolist() == [False, False, train_on != "all", False]
