"""Tests for experiments/label_server.py: the queue and its Flask app, with Flask's test client."""

import json
import os
import stat
import subprocess
import sys

import pytest

from experiments import label_report, label_server
from rlhf_jax import errors
from rlhf_jax.data import preferences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATERS = {"tok-alice": "alice", "tok-bob": "bob", "tok-carol": "carol"}


class Clock:
  def __init__(self, now=1_700_000_000.0):
    self.now = now

  def __call__(self):
    return self.now


class FixedSide:
  """An rng stand-in that always puts response `side` on the left."""

  def __init__(self, side):
    self.side = side

  def choice(self, options):
    return self.side


def _pair(pair_id, anchor=False, expected=None):
  pair = {
    "pair_id": pair_id,
    "prompt": f"Question {pair_id}?",
    "response_a": f"answer A of {pair_id}",
    "response_b": f"answer B of {pair_id}",
  }
  if anchor:
    pair["anchor"] = True
  if expected:
    pair["expected"] = expected
  return pair


def _write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines))


def _queue_dir(tmp_path, pairs, raters=RATERS):
  directory = tmp_path / "queue"
  directory.mkdir(parents=True, exist_ok=True)
  _write_lines(directory / "pairs.jsonl", [json.dumps(p) for p in pairs])
  (directory / "raters.json").write_text(json.dumps(raters))
  return directory


def _queue(directory, **kwargs):
  kwargs.setdefault("clock", Clock())
  return label_server.LabelQueue(str(directory), **kwargs)


def _client(queue):
  return label_server.create_app(queue).test_client()


def _next(client, token):
  response = client.get(f"/api/next?token={token}")
  assert response.status_code == 200, response.get_json()
  return response.get_json()


def _label(client, token, item, choice="left", confidence=3, comment="", **extra):
  body = {"token": token, "pair_id": item["pair_id"], "left": item["left"], "choice": choice}
  body.update(confidence=confidence, comment=comment, **extra)
  return client.post("/api/label", json=body)


def _choice_for(item, side):
  """The page's choice ("left"/"right"/"tie") that picks response `side` ("a"/"b"/"tie")."""
  if side == "tie":
    return "tie"
  return "left" if item["left"] == side else "right"


def _labels(directory):
  path = directory / "labels.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _run(*args):
  return subprocess.run(
    [sys.executable, "-m", "experiments.label_server", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )


# ----------------------------------------------------------------------------- bad input

GOOD = [json.dumps(_pair("p0")), json.dumps(_pair("p1", anchor=True, expected="a"))]


def _line(**changes):
  """A pairs.jsonl line: a good pair "p2" with fields changed (None: left out)."""
  pair = {"pair_id": "p2", "prompt": "q", "response_a": "x", "response_b": "y", **changes}
  return json.dumps({k: v for k, v in pair.items() if v is not None})


@pytest.mark.parametrize(
  "line, field, fragment",
  [
    ('{"pair_id": "p2", "prompt": ', None, "not valid JSON"),
    ('["p2"]', None, "expected an object"),
    (_line(pair_id=None), "pair_id", "missing"),
    (_line(pair_id=""), "pair_id", "non-empty"),
    (_line(pair_id="p0"), "pair_id", "already on line 1"),
    (_line(prompt=None), "prompt", "missing"),
    (_line(response_a=" "), "response_a", "non-empty"),
    (_line(response_b=3), "response_b", "string"),
    (_line(response_b="x"), "response_b", "same text"),
    (_line(anchor=1), "anchor", "true or false"),
    (_line(expected="c"), "expected", "one of"),
  ],
)
def test_bad_pairs_file_names_line_and_field(tmp_path, line, field, fragment):
  directory = _queue_dir(tmp_path, [])
  _write_lines(directory / "pairs.jsonl", [*GOOD, line])
  with pytest.raises(errors.DataError) as info:
    _queue(directory)
  error = info.value
  assert (error.path, error.line, error.field) == (str(directory / "pairs.jsonl"), 3, field)
  assert fragment in error.reason
  assert str(error).startswith(f"{directory / 'pairs.jsonl'}:3: ")
  if field:
    assert repr(field) in str(error)


def test_cli_bad_pairs_file_one_line_exit_2(tmp_path):
  directory = _queue_dir(tmp_path, [])
  _write_lines(directory / "pairs.jsonl", [*GOOD, '{"pair_id": "p2", "prompt": "q"}'])
  result = _run(f"--queue={directory}", "--port=0")
  assert result.returncode == errors.EXIT_CODE
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith(f"FATAL data error: {directory / 'pairs.jsonl'}:3: ")
  assert "'response_a'" in lines[0]

  missing = _run(f"--queue={tmp_path / 'nowhere'}", "--port=0")
  assert missing.returncode == errors.EXIT_CODE
  assert "Traceback" not in missing.stderr and "pairs.jsonl" in missing.stderr
  assert len(missing.stderr.strip().splitlines()) == 1


def test_bad_labels_file_stops_at_start(tmp_path):
  directory = _queue_dir(tmp_path, [_pair("p0"), _pair("p1")])
  record = {"prompt": "Question p0?", "chosen": "answer A of p0", "rejected": "x"}
  _write_lines(directory / "labels.jsonl", ['{"prompt": "q", "chosen": "a"}'])
  with pytest.raises(errors.DataError, match=r"labels.jsonl:1: missing field 'rejected'"):
    _queue(directory)
  # A label whose pair_id names other texts than pairs.jsonl (the pair was edited).
  _write_lines(directory / "labels.jsonl", [json.dumps({**record, "pair_id": "p0"})])
  with pytest.raises(errors.DataError, match=r"labels.jsonl:1: pair_id 'p0' labels other"):
    _queue(directory)


# ------------------------------------------------------------------------------- raters


def test_unknown_token_gets_403(tmp_path):
  client = _client(_queue(_queue_dir(tmp_path, [_pair("p0")])))
  for url in ("/", "/?token=nope", "/?token="):
    response = client.get(url)
    assert response.status_code == 403
    assert "Unknown rater token" in response.get_data(as_text=True)
  response = client.get("/api/next?token=nope")
  assert response.status_code == 403 and "unknown rater token" in response.get_json()["error"]
  response = client.post("/api/label", json={"token": "nope", "pair_id": "p0", "choice": "tie"})
  assert response.status_code == 403
  page = client.get("/?token=tok-alice")
  assert page.status_code == 200
  html = page.get_data(as_text=True)
  assert '"rater_id": "alice"' in html and '"token": "tok-alice"' in html
  assert "nonce-" in page.headers["Content-Security-Policy"]
  assert page.headers["Referrer-Policy"] == "no-referrer"


def test_add_rater(tmp_path):
  directory = _queue_dir(tmp_path, [_pair("p0")], raters={})
  os.remove(directory / "raters.json")
  queue = _queue(directory)
  token, new = label_server.add_rater(str(directory), "alice")
  assert new and len(token) >= 20
  assert label_server.add_rater(str(directory), "alice") == (token, False)
  other, new = label_server.add_rater(str(directory), "bob")
  assert new and other != token
  raters = json.loads((directory / "raters.json").read_text())
  assert raters == {token: "alice", other: "bob"}
  assert stat.S_IMODE(os.stat(directory / "raters.json").st_mode) == 0o600
  assert queue.rater_for(token) == "alice"  # a running server sees new raters
  with pytest.raises(errors.ConfigError, match="rater id"):
    label_server.add_rater(str(directory), "bad id")

  result = _run(f"--queue={directory}", "--add_rater=carol", "--port=9123")
  assert result.returncode == 0, result.stderr
  url = result.stdout.strip()
  assert url.startswith("http://127.0.0.1:9123/?token=")
  assert json.loads((directory / "raters.json").read_text())[url.split("token=")[1]] == "carol"


# ------------------------------------------------------------------------------ serving


def _label_all(client, token, sides=None):
  """Labels until the rater is done; returns the served pair ids in order."""
  served = []
  while True:
    data = _next(client, token)
    if data["state"] != "item":
      assert data["state"] == "done" and data["item"] is None
      return served
    assert data["progress"]["labelled"] == len(served)
    served.append(data["item"]["pair_id"])
    assert _label(client, token, data["item"]).get_json() == {"ok": True, "duplicate": False}


def test_serving_order_and_anchor_insertion(tmp_path):
  pairs = [_pair(f"o{i}") for i in range(8)] + [_pair(f"a{i}", anchor=True) for i in range(2)]
  queue = _queue(_queue_dir(tmp_path, pairs), anchor_every=3)
  client = _client(queue)
  first = _next(client, "tok-alice")
  assert first["progress"] == {"labelled": 0, "left": 10}
  # A reload shows the same item in the same order.
  assert _next(client, "tok-alice")["item"] == first["item"]
  served = _label_all(client, "tok-alice")
  assert served == ["o0", "o1", "a0", "o2", "o3", "a1", "o4", "o5", "o6", "o7"]
  # Every ordinary pair has its label: bob gets only the anchors, then is done.
  assert _next(client, "tok-bob")["progress"] == {"labelled": 0, "left": 2}
  assert _label_all(client, "tok-bob") == ["a0", "a1"]
  done = _next(client, "tok-bob")
  assert done["progress"] == {"labelled": 2, "left": 0}

  # anchor_every=0: the anchors after the ordinary pairs.
  queue = _queue(_queue_dir(tmp_path / "zero", pairs), anchor_every=0)
  assert _label_all(_client(queue), "tok-alice") == [f"o{i}" for i in range(8)] + ["a0", "a1"]


def test_left_right_order_is_random_and_recorded(tmp_path):
  pairs = [_pair(f"o{i}") for i in range(40)]
  directory = _queue_dir(tmp_path, pairs)
  client = _client(_queue(directory))
  lefts = []
  for _ in range(40):
    item = _next(client, "tok-alice")["item"]
    lefts.append(item["left"])
    pair = next(p for p in pairs if p["pair_id"] == item["pair_id"])
    right = "b" if item["left"] == "a" else "a"
    assert item["left_text"] == pair[f"response_{item['left']}"]
    assert item["right_text"] == pair[f"response_{right}"]
    _label(client, "tok-alice", item, "left")
  assert 5 < lefts.count("a") < 35
  for record in _labels(directory):
    assert record["shown_order"] == "chosen_first"
    assert record["chosen"] == f"answer {record['left'].upper()} of {record['pair_id']}"


def test_labels_per_pair_with_several_raters(tmp_path):
  directory = _queue_dir(tmp_path, [_pair("p0"), _pair("p1")])
  client = _client(_queue(directory, labels_per_pair=2))
  alice = _next(client, "tok-alice")["item"]
  bob = _next(client, "tok-bob")["item"]
  carol = _next(client, "tok-carol")["item"]
  # Fewest labels plus assignments first: bob gets the untouched pair; carol the first.
  assert (alice["pair_id"], bob["pair_id"], carol["pair_id"]) == ("p0", "p1", "p0")
  assert _label(client, "tok-alice", alice).status_code == 200
  alice = _next(client, "tok-alice")["item"]
  assert alice["pair_id"] == "p1"  # never p0 again
  for token, item in (("tok-bob", bob), ("tok-carol", carol), ("tok-alice", alice)):
    assert _label(client, token, item).status_code == 200
  for token in RATERS:
    assert _next(client, token)["state"] == "done"
  by_pair = {}
  for record in _labels(directory):
    by_pair.setdefault(record["pair_id"], []).append(record["rater_id"])
  assert {k: sorted(v) for k, v in by_pair.items()} == {
    "p0": ["alice", "carol"],
    "p1": ["alice", "bob"],
  }


def test_last_needed_label_goes_to_one_rater(tmp_path):
  directory = _queue_dir(tmp_path, [_pair("p0")])
  client = _client(_queue(directory, labels_per_pair=2))
  _label(client, "tok-alice", _next(client, "tok-alice")["item"])
  bob = _next(client, "tok-bob")
  assert bob["item"]["pair_id"] == "p0"
  carol = _next(client, "tok-carol")
  assert carol["state"] == "wait" and carol["item"] is None
  assert carol["progress"] == {"labelled": 0, "left": 1}
  _label(client, "tok-bob", bob["item"])
  assert _next(client, "tok-carol")["state"] == "done"
  assert len(_labels(directory)) == 2


def test_lease_expiry(tmp_path):
  clock = Clock()
  directory = _queue_dir(tmp_path, [_pair("p0")])
  client = _client(_queue(directory, lease_seconds=60, clock=clock))
  alice = _next(client, "tok-alice")["item"]
  assert _next(client, "tok-bob")["state"] == "wait"
  clock.now += 59
  assert _next(client, "tok-alice")["item"] == alice  # still hers
  assert _next(client, "tok-bob")["state"] == "wait"
  clock.now += 2  # 61 s after it was served: the lease has expired
  bob = _next(client, "tok-bob")["item"]
  assert bob["pair_id"] == "p0"
  assert _next(client, "tok-alice")["state"] == "wait"  # now bob's
  # A late label from alice still counts (she was served the pair); so does bob's.
  late = _label(client, "tok-alice", alice, "tie")
  assert late.get_json() == {"ok": True, "duplicate": False}
  assert _label(client, "tok-bob", bob).status_code == 200
  records = _labels(directory)
  assert [r["rater_id"] for r in records] == ["alice", "bob"]
  assert records[0]["seconds_on_item"] == pytest.approx(61.0)


def test_double_submit_records_one_label(tmp_path):
  directory = _queue_dir(tmp_path, [_pair("p0"), _pair("p1")])
  client = _client(_queue(directory))
  item = _next(client, "tok-alice")["item"]
  first = _label(client, "tok-alice", item, "left", confidence=5)
  assert first.status_code == 200 and first.get_json() == {"ok": True, "duplicate": False}
  for choice in ("left", "right"):  # a retried request, then a late second key press
    again = _label(client, "tok-alice", item, choice, confidence=1)
    assert again.status_code == 200 and again.get_json() == {"ok": True, "duplicate": True}
  records = _labels(directory)
  assert len(records) == 1
  assert records[0]["confidence"] == 5 and records[0]["shown_order"] == "chosen_first"


def test_rejects_bad_labels(tmp_path):
  directory = _queue_dir(tmp_path, [_pair("p0"), _pair("p1")])
  client = _client(_queue(directory))
  item = _next(client, "tok-alice")["item"]
  cases = [
    ({"pair_id": "nope"}, 404, "unknown pair_id 'nope'"),
    ({"pair_id": "p1"}, 409, "not served to rater 'alice'"),
    ({"choice": "up"}, 400, "'choice'"),
    ({"confidence": 7}, 400, "'confidence'"),
    ({"confidence": "3"}, 400, "'confidence'"),
    ({"comment": 5}, 400, "'comment'"),
    ({"left": "b" if item["left"] == "a" else "a"}, 409, "was shown with"),
  ]
  for change, status, message in cases:
    body = {"token": "tok-alice", "pair_id": "p0", "left": item["left"], "choice": "tie"}
    response = client.post("/api/label", json={**body, **change})
    assert response.status_code == status, change
    assert message in response.get_json()["error"], change
  assert client.post("/api/label", data="x").status_code == 400
  assert client.get("/api/label").status_code == 405
  assert not (directory / "labels.jsonl").exists()


def test_records_validate_and_label_report_reads_them(tmp_path):
  pairs = [_pair(f"o{i}") for i in range(6)] + [_pair("a0", anchor=True, expected="b")]
  directory = _queue_dir(tmp_path, pairs)
  client = _client(_queue(directory, anchor_every=2))
  pressed = {}
  plan = [("left", 1), ("right", 2), ("tie", 3), ("left", 4), ("right", 5), ("left", 3)]
  for token in ("tok-alice", "tok-bob"):
    for i, (choice, confidence) in enumerate(plan):
      data = _next(client, token)
      if data["state"] != "item":
        break
      item = data["item"]
      comment = "too long" if i == 1 else ""
      pressed[(token, item["pair_id"])] = (item, choice, confidence, comment)
      assert _label(client, token, item, choice, confidence, comment).status_code == 200
  records = _labels(directory)
  assert len(records) == len(pressed) == 8  # alice 6 items; bob the anchor, then done
  by_id = {p["pair_id"]: p for p in pairs}
  for line, record in enumerate(records, start=1):
    fail = lambda message, field, line=line: errors.DataError("labels", line, message, field)
    valid = preferences.validate_preference(record, fail)
    item, choice, confidence, comment = pressed[(f"tok-{record['rater_id']}", record["pair_id"])]
    pair = by_id[record["pair_id"]]
    left, right = item["left_text"], item["right_text"]
    if choice == "tie":
      assert (record["chosen"], record["rejected"]) == (pair["response_a"], pair["response_b"])
      assert valid["tie"] and valid["margin"] == 0
      want = "chosen_first" if item["left"] == "a" else "rejected_first"
      assert record["shown_order"] == want
    else:
      winner, loser = (left, right) if choice == "left" else (right, left)
      assert (record["chosen"], record["rejected"], valid["tie"]) == (winner, loser, False)
      assert record["shown_order"] == ("chosen_first" if choice == "left" else "rejected_first")
    assert (valid["confidence"], record["comment"], record["left"]) == (
      confidence,
      comment,
      item["left"],
    )
    assert valid["anchor"] == pair.get("anchor", False) and valid["pair_id"] == pair["pair_id"]
    assert valid["prompt"] == pair["prompt"] and valid["time"] == pytest.approx(Clock().now)
  report = label_report.make_report(str(directory / "labels.jsonl"), min_shared=1)
  assert report["counts"]["records"] == 8 and report["counts"]["raters"] == 2
  assert report["counts"]["anchor_items"] == 1 and report["counts"]["duplicate_labels"] == 0

  result = subprocess.run(
    [sys.executable, "-m", "experiments.label_report", f"--data={directory / 'labels.jsonl'}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert "8 records" in result.stdout


def test_tie_record(tmp_path):
  directory = _queue_dir(tmp_path, [_pair("p0")])
  client = _client(_queue(directory, rng=FixedSide("b")))
  item = _next(client, "tok-alice")["item"]
  assert item["left"] == "b" and item["left_text"] == "answer B of p0"
  assert _label(client, "tok-alice", item, "tie", 2, "both fine").status_code == 200
  (record,) = _labels(directory)
  assert record == {
    "prompt": "Question p0?",
    "chosen": "answer A of p0",
    "rejected": "answer B of p0",
    "tie": True,
    "margin": 0.0,
    "confidence": 2,
    "rater_id": "alice",
    "pair_id": "p0",
    "anchor": False,
    "shown_order": "rejected_first",
    "time": Clock().now,
    "comment": "both fine",
    "left": "b",
    "seconds_on_item": 0.0,
  }


def test_restart_continues(tmp_path):
  directory = _queue_dir(tmp_path, [_pair(f"o{i}") for i in range(4)])
  client = _client(_queue(directory))
  done = []
  for _ in range(2):
    item = _next(client, "tok-alice")["item"]
    _label(client, "tok-alice", item)
    done.append(item)
  on_screen = _next(client, "tok-alice")["item"]
  assert on_screen["pair_id"] == "o2"
  before = (directory / "labels.jsonl").read_bytes()

  queue = _queue(directory)  # the server restarted
  assert [r["pair_id"] for r in queue.records()] == ["o0", "o1"]
  client = _client(queue)
  # The item that was on screen was not served by this server: refused, then served anew.
  refused = _label(client, "tok-alice", on_screen)
  assert refused.status_code == 409 and "restarted" in refused.get_json()["error"]
  assert _label(client, "tok-alice", done[0]).get_json()["duplicate"] is True
  data = _next(client, "tok-alice")
  assert data["progress"] == {"labelled": 2, "left": 2}
  assert data["item"]["pair_id"] == "o2"
  assert (directory / "labels.jsonl").read_bytes() == before
  assert _next(client, "tok-bob")["item"]["pair_id"] == "o3"


def test_two_servers_on_one_queue_do_not_clobber(tmp_path):
  directory = _queue_dir(tmp_path, [_pair(f"o{i}") for i in range(3)])
  first, second = _client(_queue(directory)), _client(_queue(directory))
  alice = _next(first, "tok-alice")["item"]
  bob = _next(second, "tok-bob")["item"]
  assert _label(first, "tok-alice", alice).status_code == 200
  assert _label(second, "tok-bob", bob).status_code == 200
  assert sorted(r["rater_id"] for r in _labels(directory)) == ["alice", "bob"]
  # The second server re-read the file: it does not offer alice's labelled pair to her.
  item = _next(second, "tok-alice")["item"]
  assert item["pair_id"] not in (alice["pair_id"], bob["pair_id"])


def test_failed_write_is_not_acknowledged_and_leaves_the_file(tmp_path, monkeypatch):
  directory = _queue_dir(tmp_path, [_pair("p0"), _pair("p1")])
  queue = _queue(directory)
  client = _client(queue)
  _label(client, "tok-alice", _next(client, "tok-alice")["item"])
  before = (directory / "labels.jsonl").read_bytes()
  item = _next(client, "tok-alice")["item"]
  payload = {"pair_id": item["pair_id"], "left": item["left"], "choice": "left"}

  def crash(src, dst):
    raise OSError("disk gone")

  with monkeypatch.context() as patch:
    patch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
      queue.submit("alice", payload)
  assert (directory / "labels.jsonl").read_bytes() == before
  assert [p for p in os.listdir(directory) if p.endswith(".tmp")] == []
  # Not recorded, so the retry is a first label, not a duplicate.
  assert queue.submit("alice", payload) == {"ok": True, "duplicate": False}
  assert len(_labels(directory)) == 2

  # A temp file left by a killed writer is removed at start.
  (directory / ".labels.jsonl.abc.tmp").write_text('{"prompt": "half')
  _queue(directory)
  assert not (directory / ".labels.jsonl.abc.tmp").exists()


def test_agreement_on_anchors(tmp_path):
  pairs = [_pair("a0", anchor=True), _pair("a1", anchor=True, expected="a"), _pair("o0")]
  client = _client(_queue(_queue_dir(tmp_path, pairs), anchor_every=1))
  nothing = {
    "anchor_agreement": None,
    "anchors_compared": 0,
    "expected_agreement": None,
    "expected_compared": 0,
  }
  assert _next(client, "tok-alice")["agreement"] == nothing
  for side in ("a", "a"):  # alice: a0 -> a, a1 -> a (the expected answer)
    item = _next(client, "tok-alice")["item"]
    _label(client, "tok-alice", item, _choice_for(item, side))
  alone = _next(client, "tok-alice")["agreement"]
  assert alone["anchor_agreement"] is None and alone["expected_agreement"] == 1.0
  for side in ("a", "b"):  # bob agrees on a0, not on a1
    item = _next(client, "tok-bob")["item"]
    _label(client, "tok-bob", item, _choice_for(item, side))
  alice = _next(client, "tok-alice")["agreement"]
  bob = _next(client, "tok-bob")["agreement"]
  assert alice == {
    "anchor_agreement": 0.5,
    "anchors_compared": 2,
    "expected_agreement": 1.0,
    "expected_compared": 1,
  }
  assert bob == {**alice, "expected_agreement": 0.0}
  assert _next(client, "tok-carol")["agreement"] == nothing
