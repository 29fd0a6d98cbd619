r"""A labeling web page for human raters: serves preference pairs, writes their labels.

  pip install -e '.[label]'                                            # Flask and waitress
  python -m experiments.label_server --queue=DIR --add_rater=alice     # prints alice's link
  python -m experiments.label_server --queue=DIR --port=8080           # serves the page
  python -m experiments.label_report --data=DIR/labels.jsonl           # who agrees with whom

Each rater opens their own link (`http://127.0.0.1:8080/?token=...`), sees a prompt and two
responses side by side, and says which is better (or a tie) and how sure they are. Every
label is one line of DIR/labels.jsonl, in the preference schema the reward model and DPO
read (rlhf_jax/data/preferences.py). See docs/labeling.md for the whole workflow.

Flags
  --queue=DIR            the queue directory (below); required.
  --add_rater=ID         add rater ID with a fresh random token to DIR/raters.json, print
                         their link and exit (a rater who already has a token: their link).
  --host=127.0.0.1       the address to listen on (0.0.0.0: every interface; the page has no
                         TLS, put it behind a proxy to serve it beyond a trusted network).
  --port=8080            the port (0: a free one; the link printed at start names it).
  --public_url=URL       the links' base, e.g. https://label.example.org; default
                         http://HOST:PORT (127.0.0.1 for 0.0.0.0).
  --labels_per_pair=1    labels from distinct raters each ordinary pair needs.
  --anchor_every=5       every N-th item of a rater is an anchor pair they have not labelled
                         yet (while there is one); 0: anchors only after the ordinary pairs.
  --lease_seconds=600    how long an ordinary pair handed to a rater is kept for them.
  --threads=8            waitress worker threads.

Queue directory
  pairs.jsonl    input, one pair per line: {"pair_id": str, "prompt": str, "response_a": str,
                 "response_b": str}, optional "anchor": true (a calibration pair every rater
                 labels) and "expected": "a" | "b" | "tie" (a reference answer; used on
                 anchors), other fields ignored. pair_ids are unique (integers are read as
                 strings), the texts non-blank and the two responses different. A malformed
                 file stops the server at start with one line naming the file, line and
                 field, exit status 2.
  raters.json    {"<token>": "<rater_id>", ...}, written by --add_rater (readable only by
                 its owner: the tokens are the raters' passwords). Edit it by hand to revoke
                 a token; a running server reads it again when it changes.
  labels.jsonl   output, one record per label: prompt, chosen, rejected, tie (chosen =
                 response_a, rejected = response_b, margin 0), confidence (1..5, what the
                 reward trainer's confidence_range=(1, 5) expects), rater_id, pair_id,
                 anchor, shown_order ("chosen_first" when the chosen response was on the
                 left; for a tie, response_a), time (unix seconds of the submit), and the
                 extra fields comment, left ("a" or "b": which response was on the left) and
                 seconds_on_item (from serving the item to the submit).

The page (keyboard first; the buttons do the same)
  a or Left arrow    the left response is better
  b or Right arrow   the right response is better
  t                  tie
  1 .. 5             confidence (1 = a guess, 5 = certain; default 3, highlighted)
  c                  type a comment (optional); Escape leaves the box, Ctrl+Enter submits
  Enter              submit, then the next item comes
The left/right order is random per item. The header shows the rater's progress (labelled /
left for them) and their agreement on anchors: the fraction of other raters' labels of the
same anchors that match theirs (per_rater anchor_agreement of
rlhf_jax.data.agreement.panel_report, from the first shared anchor on), and on anchors with
an expected answer, the fraction matching it ("not yet" until there is something to compare).

Serving. Each rater's stream is ordinary pairs that still need labels, those with the fewest
labels plus outstanding assignments first (then in file order), with an unlabelled anchor as
every --anchor_every-th item; when no ordinary pair is left for them, the remaining anchors;
then "done". An ordinary pair is handed to at most as many raters at a time as it still
needs labels, so two raters do not both take its last label; a rater keeps their item (and
its left/right order) across reloads until the lease expires, after which the pair may go
to someone else. A label for an expired assignment still counts if it arrives (a pair may
then get one label more than asked). Assignments live in memory: after a restart an item on
a rater's screen is refused (409) and the page moves on to a freshly served one.

Crash safety. Each label rewrites labels.jsonl through rlhf_jax.utils.write_jsonl_atomic
(temp file, fsync, rename; then the directory is fsynced) while holding a threading lock and
a file lock on DIR/labels.jsonl.lock, and only then is the label acknowledged: a crash at any
moment leaves the old or the new file, never a partial line, and loses no acknowledged
label. Under the file lock the server first re-reads the file if another process changed it,
so two servers on one queue do not clobber each other's labels (each hands out pairs on its
own, though). A second submit of the same rater for the same pair (Enter pressed twice, a
retried request) records nothing and answers success, with "duplicate": true. A restarted
server reads labels.jsonl and carries on where it stopped; a malformed labels.jsonl stops it
at start like a malformed pairs file.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import random
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import filelock
from absl import app, flags

from rlhf_jax import errors, utils
from rlhf_jax.data import agreement, preferences
from rlhf_jax.errors import DataError

_QUEUE = flags.DEFINE_string("queue", None, "The queue directory (pairs.jsonl, raters.json).")
_ADD_RATER = flags.DEFINE_string(
  "add_rater", None, "Add a rater with this id, print their link and exit."
)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8080, "Port to listen on (0: a free one).", lower_bound=0)
_PUBLIC_URL = flags.DEFINE_string("public_url", None, "Base of the raters' links.")
_LABELS_PER_PAIR = flags.DEFINE_integer(
  "labels_per_pair", 1, "Labels from distinct raters per ordinary pair.", lower_bound=1
)
_ANCHOR_EVERY = flags.DEFINE_integer(
  "anchor_every", 5, "Every N-th item is an anchor (0: anchors last).", lower_bound=0
)
_LEASE_SECONDS = flags.DEFINE_float(
  "lease_seconds", 600.0, "How long an assigned pair is kept for its rater.", lower_bound=1.0
)
_THREADS = flags.DEFINE_integer("threads", 8, "waitress worker threads.", lower_bound=1)
flags.mark_flag_as_required("queue")

PAIRS_FILE = "pairs.jsonl"
RATERS_FILE = "raters.json"
LABELS_FILE = "labels.jsonl"
EXPECTED = ("a", "b", "tie")
CHOICES = ("left", "right", "tie")
CONFIDENCES = (1, 2, 3, 4, 5)
DEFAULT_CONFIDENCE = 3
MAX_COMMENT_CHARS = 10_000
_RATER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_FILE_LOCK_TIMEOUT = 30.0


# ------------------------------------------------------------------------------ the files


@dataclasses.dataclass(frozen=True)
class Pair:
  """One line of pairs.jsonl."""

  pair_id: str
  prompt: str
  response_a: str
  response_b: str
  anchor: bool = False
  expected: str | None = None  # "a", "b" or "tie"
  line: int = 0

  def response(self, side: str) -> str:
    return self.response_a if side == "a" else self.response_b


def _validate_pair(record: Any, fail: Callable[[str, str | None], DataError]) -> Pair:
  if not isinstance(record, Mapping):
    raise fail(
      "expected an object with fields 'pair_id', 'prompt', 'response_a' and 'response_b', "
      f"got {type(record).__name__}",
      None,
    )
  if record.get("pair_id") is None:
    raise fail("missing field 'pair_id'", "pair_id")
  pair_id = record["pair_id"]
  if isinstance(pair_id, bool) or not isinstance(pair_id, str | int):
    raise fail(f"field 'pair_id' must be a string, got {type(pair_id).__name__}", "pair_id")
  pair_id = str(pair_id)
  if not pair_id.strip():
    raise fail(f"field 'pair_id' must be a non-empty string, got {pair_id!r}", "pair_id")
  texts = {}
  for field in ("prompt", "response_a", "response_b"):
    if record.get(field) is None:
      raise fail(f"missing field {field!r}", field)
    value = record[field]
    if not isinstance(value, str) or not value.strip():
      got = repr(value) if isinstance(value, str) else type(value).__name__
      raise fail(f"field {field!r} must be a non-empty string, got {got}", field)
    texts[field] = value
  if texts["response_a"] == texts["response_b"]:
    raise fail(
      "fields 'response_a' and 'response_b' hold the same text; a rater cannot prefer one",
      "response_b",
    )
  anchor = record.get("anchor")
  if anchor is None:
    anchor = False
  elif not isinstance(anchor, bool):
    raise fail(f"field 'anchor' must be true or false, got {type(anchor).__name__}", "anchor")
  expected = record.get("expected")
  if expected is not None and expected not in EXPECTED:
    raise fail(f"field 'expected' must be one of 'a', 'b', 'tie', got {expected!r}", "expected")
  return Pair(pair_id=pair_id, anchor=anchor, expected=expected, **texts)


def read_pairs(path: str) -> list[Pair]:
  """The pairs of a pairs.jsonl file, in file order.

  Raises:
    DataError: naming the line and field of the first malformed pair (bad JSON, a missing
      or empty field, a duplicate pair_id, two identical responses, a bad `expected`).
    OSError: the file cannot be read.
  """
  pairs: list[Pair] = []
  first_line: dict[str, int] = {}
  rows = preferences.iter_preference_file(path, validate=_validate_pair)
  for line, pair in rows:
    if pair.pair_id in first_line:
      raise DataError(
        path,
        line,
        f"field 'pair_id': {pair.pair_id!r} is already on line {first_line[pair.pair_id]}",
        "pair_id",
      )
    first_line[pair.pair_id] = line
    pairs.append(dataclasses.replace(pair, line=line))
  return pairs


def read_raters(path: str) -> dict[str, str]:
  """{token: rater_id} of a raters.json file; {} when there is none.

  Raises:
    DataError: not a JSON object of non-empty strings to valid rater ids.
  """
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    return {}
  try:
    raters = json.loads(text)
  except json.JSONDecodeError as error:
    raise DataError(path, error.lineno, f"not valid JSON ({error.msg})") from None
  if not isinstance(raters, dict):
    raise DataError(path, 0, "expected a JSON object {token: rater_id}")
  for token, rater in raters.items():
    if not token or not isinstance(rater, str) or not _RATER_ID.fullmatch(rater):
      raise DataError(
        path,
        0,
        f"token {token[:6]!r}...: rater id {rater!r} must be 1-64 letters, digits or _.@- "
        "(starting with a letter or digit), and the token non-empty",
      )
  return raters


def _validate_label(record: Any, fail: Callable[[str, str | None], DataError]) -> dict:
  preferences.validate_preference(record, fail)  # raises for a bad record
  return dict(record)  # kept as written: extra fields and all


def read_labels(path: str) -> list[tuple[int, dict[str, Any]]]:
  """(line, record as written) of a labels.jsonl file, each checked against the schema."""
  if not os.path.exists(path):
    return []
  return list(preferences.iter_preference_file(path, validate=_validate_label))


def _fsync_directory(path: str) -> None:
  """Makes a rename in `path` durable (a power cut after it cannot bring back the old file)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _stat_key(path: str) -> tuple[int, int, int] | None:
  try:
    stat = os.stat(path)
  except FileNotFoundError:
    return None
  return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def add_rater(directory: str, rater_id: str) -> tuple[str, bool]:
  """Gives `rater_id` a fresh token in DIR/raters.json; returns (token, whether it is new).

  A rater who already has a token keeps it (and gets it back). raters.json is rewritten
  atomically, under a file lock, readable only by its owner.

  Raises:
    ConfigError: a rater id that is not 1-64 letters, digits or _.@-.
    DataError: a malformed raters.json.
  """
  if not _RATER_ID.fullmatch(rater_id):
    raise errors.ConfigError(
      f"--add_rater={rater_id!r}: a rater id is 1-64 letters, digits or _.@- (starting with a "
      "letter or digit)"
    )
  path = os.path.join(directory, RATERS_FILE)
  os.makedirs(directory, exist_ok=True)
  with filelock.FileLock(path + ".lock", timeout=_FILE_LOCK_TIMEOUT):
    raters = read_raters(path)
    for token, rater in raters.items():
      if rater == rater_id:
        return token, False
    token = secrets.token_urlsafe(18)
    raters[token] = rater_id
    with utils.atomic_open(path) as f:
      os.fchmod(f.fileno(), 0o600)  # before any token is written; the rename keeps it
      json.dump(raters, f, indent=2)
      f.write("\n")
  return token, True


# ------------------------------------------------------------------------------ the queue


class LabelError(Exception):
  """A request the queue refuses; `status` is its HTTP status."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass
class Assignment:
  """A pair handed to a rater: which response is on the left, and when it was served."""

  pair_id: str
  left: str  # "a" or "b"
  served_at: float


def _nan_to_none(value: float) -> float | None:
  return None if value is None or not math.isfinite(value) else float(value)


class LabelQueue:
  """The pairs, the raters, the labels so far and who is working on what; thread-safe.

  Args:
    directory: the queue directory.
    labels_per_pair: labels from distinct raters each ordinary pair needs.
    anchor_every: every N-th item of a rater is an anchor (0: anchors last).
    lease_seconds: how long an ordinary pair handed to a rater is kept for them.
    clock: unix seconds (tests pass a fake one).
    rng: draws the left/right order.
  Raises:
    DataError: a malformed pairs.jsonl, raters.json or labels.jsonl, or labels of a pair_id
      whose texts differ from pairs.jsonl's.
    OSError: pairs.jsonl cannot be read.
  """

  def __init__(
    self,
    directory: str,
    *,
    labels_per_pair: int = 1,
    anchor_every: int = 5,
    lease_seconds: float = 600.0,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
  ):
    if labels_per_pair < 1 or anchor_every < 0 or not lease_seconds > 0:
      raise errors.ConfigError(
        f"need labels_per_pair >= 1, anchor_every >= 0 and lease_seconds > 0, got "
        f"{labels_per_pair}, {anchor_every}, {lease_seconds}"
      )
    self.directory = directory
    self.pairs_path = os.path.join(directory, PAIRS_FILE)
    self.raters_path = os.path.join(directory, RATERS_FILE)
    self.labels_path = os.path.join(directory, LABELS_FILE)
    self.labels_per_pair = labels_per_pair
    self.anchor_every = anchor_every
    self.lease_seconds = float(lease_seconds)
    self._clock = clock
    self._rng = rng or random.Random()
    self.pairs = read_pairs(self.pairs_path)
    self.by_id = {pair.pair_id: pair for pair in self.pairs}
    self.anchors = [pair for pair in self.pairs if pair.anchor]
    self.ordinary = [pair for pair in self.pairs if not pair.anchor]

    self._lock = threading.RLock()
    self._file_lock = filelock.FileLock(self.labels_path + ".lock", timeout=_FILE_LOCK_TIMEOUT)
    self._raters: dict[str, str] = {}
    self._raters_key: tuple | None = None
    self._records: list[dict[str, Any]] = []
    self._labels_key: tuple | None = None
    self._by_rater: dict[str, dict[str, dict[str, Any]]] = {}
    self._raters_of: dict[str, set[str]] = {}
    self._leases: dict[str, dict[str, float]] = {}  # pair_id -> {rater: expiry}
    self._served: dict[tuple[str, str], Assignment] = {}
    self._current: dict[str, str] = {}  # rater -> pair_id on their screen
    self._version = 0
    self._stats: tuple[int, dict[str, Any]] | None = None
    self._load_raters()
    with self._lock, self._file_lock:
      self._remove_stale_temp_files()
      self._sync_labels()

  # --- files

  def _load_raters(self) -> None:
    key = _stat_key(self.raters_path)
    if key != self._raters_key:
      self._raters = read_raters(self.raters_path)
      self._raters_key = key

  def rater_for(self, token: str | None) -> str | None:
    """The rater id of a token, None for an unknown one (raters.json is re-read on change)."""
    with self._lock:
      try:
        self._load_raters()
      except DataError as error:  # a bad hand edit: keep the raters we had
        sys.stderr.write(f"label_server: ignoring a malformed raters.json: {error}\n")
      return self._raters.get(token) if token else None

  @property
  def num_raters(self) -> int:
    return len(set(self._raters.values()))

  def _remove_stale_temp_files(self) -> None:
    """Temp files a killed writer left (held file lock: nobody is writing one now)."""
    pattern = os.path.join(self.directory, f".{LABELS_FILE}.*.tmp")
    for path in glob.glob(pattern):
      os.remove(path)

  def _check_against_pairs(self, line: int, record: Mapping[str, Any]) -> None:
    pair = self.by_id.get(str(record.get("pair_id") or ""))
    if pair is None:
      return  # a label of a pair no longer queued: kept in the file, not counted
    same = (
      record["prompt"] == pair.prompt
      and {record["chosen"], record["rejected"]} == {pair.response_a, pair.response_b}
      and bool(record.get("anchor", False)) == pair.anchor
    )
    if not same:
      raise DataError(
        self.labels_path,
        line,
        f"pair_id {pair.pair_id!r} labels other texts (or another anchor flag) than line "
        f"{pair.line} of {self.pairs_path}; give a changed pair a new pair_id",
        "pair_id",
      )

  def _sync_labels(self) -> None:
    """Re-reads labels.jsonl when it changed on disk (start, or another server process)."""
    key = _stat_key(self.labels_path)
    if key == self._labels_key:
      return
    rows = read_labels(self.labels_path)
    for line, record in rows:
      self._check_against_pairs(line, record)
    self._records = [record for _, record in rows]
    self._by_rater, self._raters_of = {}, {}
    for record in self._records:
      self._index(record)
    self._labels_key = key
    self._version += 1

  def _index(self, record: Mapping[str, Any]) -> None:
    rater, pair_id = str(record.get("rater_id") or ""), str(record.get("pair_id") or "")
    if rater and pair_id:
      self._by_rater.setdefault(rater, {}).setdefault(pair_id, dict(record))
      self._raters_of.setdefault(pair_id, set()).add(rater)

  def records(self) -> list[dict[str, Any]]:
    """The labels so far, as written."""
    with self._lock:
      self._sync_labels()
      return [dict(record) for record in self._records]

  # --- serving

  def _expire(self, now: float) -> None:
    for pair_id in list(self._leases):
      holders = {r: t for r, t in self._leases[pair_id].items() if t > now}
      if holders:
        self._leases[pair_id] = holders
      else:
        del self._leases[pair_id]

  def _num_labels(self, pair_id: str) -> int:
    return len(self._raters_of.get(pair_id, ()))

  def _needs_labels(self, pair: Pair) -> bool:
    return self._num_labels(pair.pair_id) < self.labels_per_pair

  def _open_to(self, rater: str, pair: Pair) -> bool:
    """Whether ordinary `pair` may be handed to `rater` now."""
    if rater in self._raters_of.get(pair.pair_id, ()):
      return False
    others = [r for r in self._leases.get(pair.pair_id, {}) if r != rater]
    return self._num_labels(pair.pair_id) + len(others) < self.labels_per_pair

  def _still_theirs(self, rater: str, pair_id: str, now: float) -> bool:
    pair = self.by_id[pair_id]
    if rater in self._raters_of.get(pair_id, ()) or (rater, pair_id) not in self._served:
      return False
    if pair.anchor:
      return True
    return self._leases.get(pair_id, {}).get(rater, 0.0) > now and self._needs_labels(pair)

  def _choose(self, rater: str) -> tuple[Pair | None, str]:
    """The next pair for `rater` and the state: "item", "wait" (others hold the rest), "done"."""
    mine = self._by_rater.get(rater, {})
    anchors_left = [pair for pair in self.anchors if pair.pair_id not in mine]
    position = len(mine) + 1
    if anchors_left and self.anchor_every and position % self.anchor_every == 0:
      return anchors_left[0], "item"
    best, best_key = None, None
    for index, pair in enumerate(self.ordinary):
      if self._open_to(rater, pair):
        key = (self._num_labels(pair.pair_id) + len(self._leases.get(pair.pair_id, {})), index)
        if best_key is None or key < best_key:
          best, best_key = pair, key
    if best is not None:
      return best, "item"
    if anchors_left:
      return anchors_left[0], "item"
    if any(self._needs_labels(p) and p.pair_id not in mine for p in self.ordinary):
      return None, "wait"
    return None, "done"

  def _items_left(self, rater: str) -> int:
    mine = self._by_rater.get(rater, {})
    anchors = sum(pair.pair_id not in mine for pair in self.anchors)
    return anchors + sum(
      pair.pair_id not in mine and self._needs_labels(pair) for pair in self.ordinary
    )

  def next_item(self, rater: str) -> dict[str, Any]:
    """What `rater`'s page shows next: {state, item, progress, agreement}."""
    with self._lock:
      self._sync_labels()
      now = self._clock()
      self._expire(now)
      pair_id = self._current.get(rater)
      if pair_id is not None and not self._still_theirs(rater, pair_id, now):
        self._leases.get(pair_id, {}).pop(rater, None)  # frees the place for someone else
        self._current.pop(rater, None)
        pair_id = None
      if pair_id is None:
        pair, state = self._choose(rater)
        if pair is not None:
          pair_id = pair.pair_id
          self._served[(rater, pair_id)] = Assignment(pair_id, self._rng.choice("ab"), now)
          self._current[rater] = pair_id
          if not pair.anchor:
            self._leases.setdefault(pair_id, {})[rater] = now + self.lease_seconds
      else:
        state = "item"
      item = None
      if pair_id is not None:
        pair, assignment = self.by_id[pair_id], self._served[(rater, pair_id)]
        right = "b" if assignment.left == "a" else "a"
        item = {
          "pair_id": pair_id,
          "prompt": pair.prompt,
          "left": assignment.left,
          "left_text": pair.response(assignment.left),
          "right_text": pair.response(right),
        }
      return {
        "state": state,
        "rater_id": rater,
        "item": item,
        "progress": {
          "labelled": len(self._by_rater.get(rater, {})),
          "left": self._items_left(rater),
        },
        "agreement": self._agreement(rater),
      }

  # --- labels

  def submit(self, rater: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Records `rater`'s label; returns {"ok": True, "duplicate": bool}.

    payload: pair_id, choice ("left", "right" or "tie"), confidence (1..5, default 3),
    comment (optional), left ("a" or "b": the order the page showed; checked when given).

    Raises:
      LabelError: 400 a malformed payload, 404 an unknown pair, 409 a pair not served to
        this rater (or shown in another order), 503 the file lock is held too long.
    """
    if not isinstance(payload, Mapping):
      raise LabelError(400, "expected a JSON object")
    pair_id = payload.get("pair_id")
    if isinstance(pair_id, int) and not isinstance(pair_id, bool):
      pair_id = str(pair_id)
    if not isinstance(pair_id, str) or not pair_id:
      raise LabelError(400, "field 'pair_id' must be a non-empty string")
    choice = payload.get("choice")
    if choice not in CHOICES:
      raise LabelError(400, f"field 'choice' must be one of {', '.join(CHOICES)}, got {choice!r}")
    confidence = payload.get("confidence", DEFAULT_CONFIDENCE)
    if isinstance(confidence, bool) or confidence not in CONFIDENCES:
      raise LabelError(400, f"field 'confidence' must be an integer 1..5, got {confidence!r}")
    comment = payload.get("comment") or ""
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS:
      raise LabelError(400, f"field 'comment' must be a string of <= {MAX_COMMENT_CHARS} chars")
    left = payload.get("left")
    if left is not None and left not in ("a", "b"):
      raise LabelError(400, f"field 'left' must be 'a' or 'b', got {left!r}")
    pair = self.by_id.get(pair_id)
    if pair is None:
      raise LabelError(404, f"unknown pair_id {pair_id!r}: not in {self.pairs_path}")
    with self._lock:
      try:
        self._file_lock.acquire()
      except filelock.Timeout:
        raise LabelError(503, "the labels file is locked by another process; retry") from None
      try:
        self._sync_labels()
        if pair_id in self._by_rater.get(rater, {}):
          return {"ok": True, "duplicate": True}  # a repeated submit: recorded once
        assignment = self._served.get((rater, pair_id))
        if assignment is None:
          raise LabelError(
            409,
            f"pair {pair_id!r} was not served to rater {rater!r} (or the server restarted since "
            "it was); load the next item",
          )
        if left is not None and left != assignment.left:
          raise LabelError(
            409, f"pair {pair_id!r} was shown with response {assignment.left!r} on the left"
          )
        now = self._clock()
        record = make_record(
          pair, rater, assignment.left, choice, confidence, comment, now, now - assignment.served_at
        )
        line = len(self._records) + 1
        fail = lambda message, field: DataError(self.labels_path, line, message, field)
        preferences.validate_preference(record, fail)
        utils.write_jsonl_atomic(self.labels_path, [*self._records, record])
        _fsync_directory(self.directory)
        self._records.append(record)
        self._index(record)
        self._labels_key = _stat_key(self.labels_path)
        self._version += 1
      finally:
        self._file_lock.release()
      self._served.pop((rater, pair_id), None)
      self._leases.get(pair_id, {}).pop(rater, None)
      if self._current.get(rater) == pair_id:
        del self._current[rater]
      return {"ok": True, "duplicate": False}

  # --- agreement

  def _agreement(self, rater: str) -> dict[str, Any]:
    """The rater's anchor agreement with the other raters and with the expected answers."""
    if self._stats is None or self._stats[0] != self._version:
      anchor_ids = {pair.pair_id for pair in self.anchors}
      records = [
        r for r in self._records if r.get("anchor") and str(r.get("pair_id")) in anchor_ids
      ]
      per_rater = {}
      if records:
        per_rater = agreement.panel_report(records, pair_key="pair_id", min_shared=1)["per_rater"]
      self._stats = (self._version, per_rater)
    stats = self._stats[1].get(rater, {})
    matches = [
      label_answer(self.by_id[pair_id], record) == self.by_id[pair_id].expected
      for pair_id, record in self._by_rater.get(rater, {}).items()
      if pair_id in self.by_id and self.by_id[pair_id].anchor and self.by_id[pair_id].expected
    ]
    return {
      "anchor_agreement": _nan_to_none(stats.get("anchor_agreement", math.nan)),
      "anchors_compared": int(stats.get("anchor_items", 0)),
      "expected_agreement": sum(matches) / len(matches) if matches else None,
      "expected_compared": len(matches),
    }


def label_answer(pair: Pair, record: Mapping[str, Any]) -> str:
  """ "a", "b" or "tie": the label of `record` in terms of `pair`'s responses."""
  if record.get("tie"):
    return "tie"
  return "a" if record["chosen"] == pair.response_a else "b"


def make_record(
  pair: Pair,
  rater: str,
  left: str,
  choice: str,
  confidence: int,
  comment: str,
  now: float,
  seconds_on_item: float,
) -> dict[str, Any]:
  """The labels.jsonl record of one label (see the module docstring)."""
  if choice == "tie":
    chosen, rejected = pair.response_a, pair.response_b
    shown_order = "chosen_first" if left == "a" else "rejected_first"
  else:
    right = "b" if left == "a" else "a"
    winner, loser = (left, right) if choice == "left" else (right, left)
    chosen, rejected = pair.response(winner), pair.response(loser)
    shown_order = "chosen_first" if choice == "left" else "rejected_first"
  record: dict[str, Any] = {
    "prompt": pair.prompt,
    "chosen": chosen,
    "rejected": rejected,
    "tie": choice == "tie",
  }
  if choice == "tie":
    record["margin"] = 0.0
  record.update(
    confidence=confidence,
    rater_id=rater,
    pair_id=pair.pair_id,
    anchor=pair.anchor,
    shown_order=shown_order,
    time=round(now, 3),
    comment=comment,
    left=left,
    seconds_on_item=round(max(seconds_on_item, 0.0), 3),
  )
  return record


# --------------------------------------------------------------------------------- the app


def _script_json(value: Any) -> str:
  """JSON safe inside a <script> element."""
  text = json.dumps(value)
  return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def create_app(queue: LabelQueue):
  """The Flask app serving `queue`: the page at /?token=..., the JSON API under /api/."""
  import flask  # Imported here: only the labeling page needs Flask (the `label` extra).

  web = flask.Flask(__name__, static_folder=None)
  web.config["MAX_CONTENT_LENGTH"] = 256 * 1024
  web.json.sort_keys = False

  def secure(response, nonce: str | None = None):
    script = f"'nonce-{nonce}'" if nonce else "'none'"
    response.headers["Content-Security-Policy"] = (
      f"default-src 'none'; script-src {script}; style-src {script}; connect-src 'self'; "
      "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    response.headers["Referrer-Policy"] = "no-referrer"  # the token is in the page's URL
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response

  def api_error(status: int, message: str):
    return secure(flask.make_response(flask.jsonify(ok=False, error=message), status))

  def api_rater(token: Any) -> str:
    rater = queue.rater_for(token if isinstance(token, str) else None)
    if rater is None:
      flask.abort(api_error(403, "unknown rater token: ask for your own labeling link"))
    return rater

  @web.get("/")
  def page():
    rater = queue.rater_for(flask.request.args.get("token"))
    nonce = secrets.token_urlsafe(16)
    if rater is None:
      html = FORBIDDEN_PAGE.replace("{{NONCE}}", nonce)
      return secure(flask.make_response(html, 403), nonce)
    config = {"token": flask.request.args["token"], "rater_id": rater}
    html = PAGE.replace("{{NONCE}}", nonce).replace("{{CONFIG}}", _script_json(config))
    return secure(flask.make_response(html), nonce)

  @web.get("/api/next")
  def api_next():
    token = flask.request.args.get("token") or flask.request.headers.get("X-Rater-Token")
    return secure(flask.jsonify(queue.next_item(api_rater(token))))

  @web.post("/api/label")
  def api_label():
    payload = flask.request.get_json(silent=True)
    if not isinstance(payload, dict):
      return api_error(400, "expected a JSON object (Content-Type: application/json)")
    rater = api_rater(payload.get("token") or flask.request.headers.get("X-Rater-Token"))
    try:
      result = queue.submit(rater, payload)
    except LabelError as error:
      return api_error(error.status, str(error))
    return secure(flask.jsonify(result))

  @web.get("/favicon.ico")
  def favicon():
    return secure(flask.make_response("", 204))

  @web.get("/healthz")
  def healthz():
    return secure(flask.jsonify(ok=True, pairs=len(queue.pairs)))

  @web.errorhandler(404)
  @web.errorhandler(405)
  @web.errorhandler(413)
  def http_error(error):
    return api_error(error.code, f"{error.name}: {error.description}")

  return web


FORBIDDEN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Unknown rater token</title>
<style nonce="{{NONCE}}">body{font:16px/1.5 system-ui,sans-serif;max-width:40em;margin:4em auto;
padding:0 1em;color:#222}</style></head>
<body><h1>Unknown rater token</h1>
<p>This link does not carry a valid rater token (403 Forbidden). Ask whoever runs the
labeling for your personal link, and open it exactly as you received it.</p></body></html>
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Preference labeling</title>
<style nonce="{{NONCE}}">
  :root { --accent: #1f5fbf; --chosen: #e6f0ff; --muted: #666; }
  * { box-sizing: border-box; }
  body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
         color: #1d1d1f; background: #f6f7f9; }
  header { display: flex; flex-wrap: wrap; gap: 0.4em 2em; align-items: baseline;
           padding: 0.7em 1.5em; background: #fff; border-bottom: 1px solid #ddd; }
  header h1 { font-size: 1.1em; margin: 0; }
  header .stat { color: var(--muted); }
  header .stat b { color: #1d1d1f; }
  main { max-width: 1200px; margin: 0 auto; padding: 1em 1.5em 2em; }
  .label { font-size: 0.8em; text-transform: uppercase; letter-spacing: 0.06em;
           color: var(--muted); margin: 0 0 0.3em; }
  .label kbd { text-transform: none; letter-spacing: 0; }
  .text { white-space: pre-wrap; overflow-wrap: anywhere; margin: 0; }
  #prompt-box { background: #fff; border: 1px solid #ddd; border-radius: 8px;
                padding: 0.8em 1em; margin-bottom: 1em; }
  .responses { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
  .response { background: #fff; border: 2px solid #ddd; border-radius: 8px;
              padding: 0.8em 1em; cursor: pointer; min-height: 6em; }
  .response.picked { border-color: var(--accent); background: var(--chosen); }
  .responses.tie .response { border-color: #8a6d00; background: #fff8e0; }
  .controls { display: flex; flex-wrap: wrap; gap: 0.8em 1.5em; align-items: center;
              margin-top: 1em; }
  button { font: inherit; padding: 0.4em 0.9em; border: 1px solid #bbb; border-radius: 6px;
           background: #fff; cursor: pointer; }
  button.on { background: var(--accent); border-color: var(--accent); color: #fff; }
  button:disabled { opacity: 0.5; cursor: default; }
  kbd { font: 0.85em ui-monospace, monospace; border: 1px solid #bbb; border-bottom-width: 2px;
        border-radius: 4px; padding: 0 0.35em; background: #fafafa; color: #333; }
  button.on kbd { background: transparent; color: #fff; border-color: #fff; }
  .group { display: flex; gap: 0.4em; align-items: center; }
  #comment { font: inherit; width: 100%; min-height: 2.6em; margin-top: 1em; padding: 0.4em;
             border: 1px solid #bbb; border-radius: 6px; resize: vertical; }
  #status { min-height: 1.5em; margin-top: 0.6em; color: var(--muted); }
  #status.error { color: #b00020; }
  .help { color: var(--muted); font-size: 0.85em; margin-top: 1.5em; }
  #message { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 2em;
             text-align: center; font-size: 1.2em; }
  [hidden] { display: none !important; }
</style>
</head>
<body>
<script type="application/json" id="config">{{CONFIG}}</script>
<header>
  <h1>Which response is better?</h1>
  <span class="stat">Rater <b id="rater"></b></span>
  <span class="stat">Labelled <b id="labelled">0</b> &middot; <b id="left-count">?</b> to go</span>
  <span class="stat">Agreement on anchors: <b id="agreement">not yet</b></span>
</header>
<main>
  <div id="message" hidden></div>
  <div id="item" hidden>
    <section id="prompt-box"><p class="label">Prompt</p><p class="text" id="prompt"></p></section>
    <div class="responses" id="responses">
      <section class="response" id="left-box">
        <p class="label">Left &middot; <kbd>a</kbd> / <kbd>&larr;</kbd></p>
        <p class="text" id="left-text"></p>
      </section>
      <section class="response" id="right-box">
        <p class="label">Right &middot; <kbd>b</kbd> / <kbd>&rarr;</kbd></p>
        <p class="text" id="right-text"></p>
      </section>
    </div>
    <div class="controls">
      <div class="group">
        <button id="choose-left" data-choice="left">Left is better <kbd>a</kbd></button>
        <button id="choose-tie" data-choice="tie">Tie <kbd>t</kbd></button>
        <button id="choose-right" data-choice="right">Right is better <kbd>b</kbd></button>
      </div>
      <div class="group" id="confidence" title="1 = a guess, 5 = certain">
        <span>How sure?</span>
        <button data-confidence="1">1</button><button data-confidence="2">2</button>
        <button data-confidence="3">3</button><button data-confidence="4">4</button>
        <button data-confidence="5">5</button>
      </div>
      <button id="submit">Submit <kbd>Enter</kbd></button>
    </div>
    <textarea id="comment" placeholder="Optional comment (press c to type here, Esc to leave)"
              maxlength="10000"></textarea>
    <div id="status"></div>
  </div>
  <p class="help"><kbd>a</kbd>/<kbd>&larr;</kbd> left better &middot;
    <kbd>b</kbd>/<kbd>&rarr;</kbd> right better &middot; <kbd>t</kbd> tie &middot;
    <kbd>1</kbd>&ndash;<kbd>5</kbd> confidence (1 = a guess, 5 = certain) &middot;
    <kbd>c</kbd> comment (<kbd>Esc</kbd> leaves it, <kbd>Ctrl</kbd>+<kbd>Enter</kbd> submits)
    &middot;
    <kbd>Enter</kbd> submit</p>
</main>
<script nonce="{{NONCE}}">
"use strict";
const CONFIG = JSON.parse(document.getElementById("config").textContent);
const $ = (id) => document.getElementById(id);
let item = null, choice = null, confidence = 3, busy = false, pollTimer = null;

function setStatus(text, isError) {
  $("status").textContent = text || "";
  $("status").className = isError ? "error" : "";
}

function percent(value) { return Math.round(100 * value) + "%"; }

function showAgreement(a) {
  const parts = [];
  if (a.anchor_agreement !== null) {
    parts.push(percent(a.anchor_agreement) + " with other raters (" + a.anchors_compared +
               " anchor" + (a.anchors_compared === 1 ? "" : "s") + ")");
  }
  if (a.expected_agreement !== null) {
    parts.push(percent(a.expected_agreement) + " with the reference answers (" +
               a.expected_compared + ")");
  }
  $("agreement").textContent = parts.length ? parts.join(" \\u00b7 ") : "not yet";
}

async function api(path, body) {
  // A request that fails on the network is sent again as it was: the server records a
  // label once however often it arrives.
  for (let attempt = 0; ; attempt++) {
    try {
      const response = body === undefined
        ? await fetch(path + "?token=" + encodeURIComponent(CONFIG.token), {cache: "no-store"})
        : await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                             body: JSON.stringify(Object.assign({token: CONFIG.token}, body))});
      let data;
      try { data = await response.json(); } catch (e) { data = {error: "HTTP " + response.status}; }
      return {ok: response.ok, status: response.status, data: data};
    } catch (error) {
      if (attempt >= 5) throw error;
      setStatus("Connection problem, retrying\\u2026", true);
      await new Promise((resolve) => setTimeout(resolve, 500 * 2 ** attempt));
    }
  }
}

function setChoice(value) {
  if (!item) return;
  choice = value;
  $("left-box").classList.toggle("picked", value === "left");
  $("right-box").classList.toggle("picked", value === "right");
  $("responses").classList.toggle("tie", value === "tie");
  for (const button of document.querySelectorAll("[data-choice]")) {
    button.classList.toggle("on", button.dataset.choice === value);
  }
  setStatus("Press Enter to submit.");
}

function setConfidence(value) {
  confidence = value;
  for (const button of document.querySelectorAll("[data-confidence]")) {
    button.classList.toggle("on", Number(button.dataset.confidence) === value);
  }
}

function render(data) {
  $("rater").textContent = data.rater_id;
  $("labelled").textContent = data.progress.labelled;
  $("left-count").textContent = data.progress.left;
  showAgreement(data.agreement);
  clearTimeout(pollTimer);
  item = data.item;
  if (data.state !== "item") {
    $("item").hidden = true;
    $("message").hidden = false;
    if (data.state === "done") {
      $("message").textContent = "All done \\u2014 thank you! You labelled " +
        data.progress.labelled + " item" + (data.progress.labelled === 1 ? "" : "s") + ".";
    } else {
      $("message").textContent = "Nothing to label right now: other raters hold the last " +
        "pairs. This page checks again every 30 seconds.";
      pollTimer = setTimeout(loadNext, 30000);
    }
    return;
  }
  $("message").hidden = true;
  $("item").hidden = false;
  $("item").dataset.pairId = item.pair_id;
  $("prompt").textContent = item.prompt;
  $("left-text").textContent = item.left_text;
  $("right-text").textContent = item.right_text;
  $("comment").value = "";
  choice = null;
  setChoice(null);
  setConfidence(3);
  setStatus("");
  window.scrollTo(0, 0);
}

async function loadNext() {
  try {
    const result = await api("/api/next");
    if (!result.ok) { setStatus(result.data.error || ("HTTP " + result.status), true); return; }
    render(result.data);
  } catch (error) {
    setStatus("Cannot reach the server: " + error + ". Reload the page to try again.", true);
  }
}

async function submit() {
  if (busy || !item) return;
  if (!choice) { setStatus("Pick the better response first: a, b or t.", true); return; }
  busy = true;
  $("submit").disabled = true;
  setStatus("Saving\\u2026");
  try {
    const result = await api("/api/label", {
      pair_id: item.pair_id, left: item.left, choice: choice, confidence: confidence,
      comment: $("comment").value,
    });
    if (result.ok) {
      await loadNext();
    } else if (result.status === 409) {
      setStatus(result.data.error + " \\u2014 loading the next item.", true);
      await loadNext();
    } else {
      setStatus(result.data.error || ("HTTP " + result.status), true);
    }
  } catch (error) {
    setStatus("Not saved: cannot reach the server (" + error + "). Press Enter to retry.", true);
  } finally {
    busy = false;
    $("submit").disabled = false;
  }
}

document.addEventListener("keydown", (event) => {
  if (document.activeElement === $("comment")) {
    if (event.key === "Escape") { $("comment").blur(); event.preventDefault(); }
    else if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("comment").blur();
      submit();
    }
    return;  // typing: no shortcuts
  }
  if (event.ctrlKey || event.metaKey || event.altKey || event.isComposing) return;
  switch (event.key) {
    case "a": case "A": case "ArrowLeft": setChoice("left"); break;
    case "b": case "B": case "ArrowRight": setChoice("right"); break;
    case "t": case "T": setChoice("tie"); break;
    case "1": case "2": case "3": case "4": case "5": setConfidence(Number(event.key)); break;
    case "c": case "C": $("comment").focus(); break;
    case "Enter": if (!event.repeat) submit(); break;
    default: return;
  }
  event.preventDefault();
});

for (const button of document.querySelectorAll("[data-choice]")) {
  button.addEventListener("click", () => { setChoice(button.dataset.choice); button.blur(); });
}
for (const button of document.querySelectorAll("[data-confidence]")) {
  button.addEventListener("click", () => {
    setConfidence(Number(button.dataset.confidence));
    button.blur();
  });
}
$("left-box").addEventListener("click", () => setChoice("left"));
$("right-box").addEventListener("click", () => setChoice("right"));
$("submit").addEventListener("click", () => { $("submit").blur(); submit(); });
$("rater").textContent = CONFIG.rater_id;
loadNext();
</script>
</body>
</html>
"""


# ------------------------------------------------------------------------------------ main


def link(base: str, token: str) -> str:
  return f"{base.rstrip('/')}/?token={token}"


def _base_url(port: int) -> str:
  if _PUBLIC_URL.value:
    return _PUBLIC_URL.value
  host = _HOST.value
  if host in ("0.0.0.0", "::", ""):
    host = "127.0.0.1"
  elif ":" in host:
    host = f"[{host}]"
  return f"http://{host}:{port}"


def _fatal(lines: list[str]) -> None:
  sys.stderr.write("\n".join(lines) + "\n")
  sys.exit(errors.EXIT_CODE)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  directory = _QUEUE.value
  try:
    if _ADD_RATER.value is not None:
      token, new = add_rater(directory, _ADD_RATER.value)
      what = "Added rater" if new else "Rater already has a link:"
      sys.stderr.write(f"{what} {_ADD_RATER.value} ({os.path.join(directory, RATERS_FILE)})\n")
      print(link(_base_url(_PORT.value), token))
      return
    queue = LabelQueue(
      directory,
      labels_per_pair=_LABELS_PER_PAIR.value,
      anchor_every=_ANCHOR_EVERY.value,
      lease_seconds=_LEASE_SECONDS.value,
    )
  except errors.Error as error:
    # The message names what to fix (file, line, field); a traceback would bury it.
    _fatal(error.lines())
  except OSError as error:  # a missing or unreadable file: its name is in the message
    _fatal([f"FATAL data error: {error}"])
  try:
    import waitress
  except ImportError:
    _fatal(["FATAL: the labeling page needs Flask and waitress: pip install -e '.[label]'"])
  web = create_app(queue)
  try:
    server = waitress.create_server(
      web, host=_HOST.value, port=_PORT.value, threads=_THREADS.value, ident="label_server"
    )
  except OSError as error:
    _fatal([f"FATAL: cannot listen on {_HOST.value}:{_PORT.value}: {error}"])
  port = server.effective_port
  records = queue.records()
  print(
    f"Serving {len(queue.pairs)} pairs ({len(queue.anchors)} anchors) from {directory} to "
    f"{queue.num_raters} raters; {len(records)} labels so far in {queue.labels_path}",
    flush=True,
  )
  if not queue.num_raters:
    print(f"No raters yet: add one with --queue={directory} --add_rater=NAME", flush=True)
  print(f"Listening on http://{_HOST.value}:{port}/ (links: {_base_url(port)}/?token=...)")
  sys.stdout.flush()
  try:
    server.run()
  except KeyboardInterrupt:
    pass
  finally:
    server.close()


if __name__ == "__main__":
  app.run(main)
