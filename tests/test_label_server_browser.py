"""The labeling page end to end: the real server (waitress) and a real headless Chromium.

A rater labels 20 items with the keyboard only, reading the two texts off the page to know
which side they pick; then labels.jsonl is checked record by record. Needs Debian's Chromium
(`apt-get install chromium`, which .ci/run does as root) and the `playwright` package (the
test extra; its own browser downloads are never used): without either the test is skipped.

RLHF_JAX_SCREENSHOT=docs/images/label_page.png saves a screenshot of the page with a pair on
screen (how docs/images/label_page.png is made).
"""

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from experiments import label_report, label_server
from rlhf_jax import errors
from rlhf_jax.data import preferences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
]
TIMEOUT_MS = 15_000

# (prompt, a better response, a worse one): the ordinary pairs.
ORDINARY = [
  (
    "How long should I boil an egg for a soft, runny yolk?",
    "About 6 minutes in water that is already boiling, then a minute in cold water so it "
    "stops cooking. Add 30 seconds if the eggs come straight from the fridge.",
    "Boil it until it's done. Eggs are a good source of protein.",
  ),
  (
    "What is the capital of Australia?",
    "Canberra. Sydney and Melbourne are larger, but Canberra was built as a compromise "
    "between the two and has been the capital since 1913.",
    "Sydney, the largest city in Australia.",
  ),
  (
    "Explain what a hash table is in one or two sentences.",
    "A hash table stores key-value pairs in an array, using a hash function to turn each "
    "key into an index, so lookups, inserts and deletes take constant time on average.",
    "A hash table is a table of hashes.",
  ),
  (
    "Suggest a name for a grey kitten.",
    "Smokey, Ash, Pebble or Earl Grey: Pebble suits a small, round kitten.",
    "Dog.",
  ),
  (
    "Why is the sky blue?",
    "Air molecules scatter short (blue) wavelengths of sunlight much more than long (red) "
    "ones (Rayleigh scattering), so blue light reaches your eyes from every part of the sky.",
    "Because it reflects the ocean.",
  ),
  (
    "Translate 'good morning' into French.",
    "Bonjour (literally 'good day'); 'bon matin' is only used in Quebec.",
    "Bonne nuit.",
  ),
  (
    "Give me a tip for falling asleep faster.",
    "Keep a fixed wake-up time, even at weekends: a regular rhythm makes you sleepy at the "
    "same hour each night. Avoid screens for the last half hour.",
    "Drink a double espresso before bed.",
  ),
  (
    "What does HTTP status code 404 mean?",
    "Not Found: the server is reachable, but it has nothing at the requested URL.",
    "The server is on fire.",
  ),
  (
    "Write a haiku about autumn.",
    "Maple leaves let go /\nthe wind carries them, unhurried, /\nto the sleeping ground",
    "Autumn is a season. It comes after summer and before winter.",
  ),
  (
    "How many legs does a spider have?",
    "Eight. Insects have six, which is one way to tell the two apart.",
    "Six, like all insects.",
  ),
  (
    "What is 15% of 80?",
    "12 (80 x 0.15 = 12).",
    "15.",
  ),
  (
    "Recommend a first programming language for a beginner.",
    "Python: its syntax is readable, it has a huge community, and you can use it for "
    "anything from scripts to data analysis.",
    "Assembly, so you learn how the machine really works before anything else.",
  ),
  (
    "Is it safe to look directly at the sun?",
    "No. Even briefly it can burn the retina (solar retinopathy); use certified eclipse "
    "glasses or a pinhole projector.",
    "Yes, as long as you squint.",
  ),
  (
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "Two young lovers from feuding families in Verona marry in secret, and a chain of "
    "misunderstandings ends with both taking their own lives.",
    "A play by Shakespeare.",
  ),
  (
    "What should I do if my laptop won't turn on?",
    "Plug in the charger and check its light, hold the power button for 15 seconds, then "
    "try again; if nothing happens, try another outlet or charger before taking it in.",
    "Buy a new laptop.",
  ),
  (
    "Name three primary colours of light.",
    "Red, green and blue (RGB); mixed at full strength they make white.",
    "Red, yellow and purple.",
  ),
  (
    "How do I undo the last git commit but keep my changes?",
    "git reset --soft HEAD~1: the commit is gone, the changes stay staged.",
    "Delete the .git folder and start over.",
  ),
  (
    "Why do cats purr?",
    "Mostly to signal contentment, but also to soothe themselves when stressed or hurt; "
    "the vibration may even help their bones heal.",
    "Cats purr because they are engines.",
  ),
  (
    "What is the boiling point of water at sea level in Fahrenheit?",
    "212 degrees Fahrenheit (100 degrees Celsius).",
    "100 degrees Fahrenheit.",
  ),
  (
    "Give a synonym for 'happy'.",
    "Cheerful (also: glad, joyful, content).",
    "Sad.",
  ),
]
# (prompt, response_a, response_b, expected): the anchors.
ANCHORS = [
  ("What is 2 + 2?", "4", "5", "a"),
  ("Which is larger, an elephant or a mouse?", "A mouse.", "An elephant.", "b"),
  ("Spell 'necessary'.", "necessary", "neccessary", None),
  ("Is Paris in France?", "Yes, it is the capital.", "No, it is in Spain.", None),
]

# What the rater presses on each of the 20 items: the side key, the confidence key (None:
# keep the default 3), and a comment on one item (typed after `c`, left with Escape).
SIDE_KEYS = ["a", "b", "ArrowLeft", "t", "ArrowRight", "b", "a"]
CONFIDENCE_KEYS = [None, "5", "1", "4", "2", None, "3"]
COMMENT_ITEM = 8
COMMENT = "left rambles a bit; the tie 1 was t"  # shortcut letters, typed as text
DOUBLE_ENTER_ITEM = 3
# The screenshot: the first item after the first anchor where the rater picks the better text.
SCREENSHOT_AFTER = 5
BETTER = {good for _, good, _ in ORDINARY}


def _sync_playwright():
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
  try:
    from playwright.sync_api import sync_playwright
  except ImportError:
    pytest.skip("the playwright package is missing: pip install -e '.[test]'")
  return sync_playwright


def _write_queue(directory):
  directory.mkdir()
  lines = []
  for i, (prompt, good, bad) in enumerate(ORDINARY):
    a, b = (good, bad) if i % 2 == 0 else (bad, good)
    lines.append({"pair_id": f"q{i:02d}", "prompt": prompt, "response_a": a, "response_b": b})
  for i, (prompt, a, b, expected) in enumerate(ANCHORS):
    anchor = {"pair_id": f"anchor{i}", "prompt": prompt, "response_a": a, "response_b": b}
    lines.append({**anchor, "anchor": True, **({"expected": expected} if expected else {})})
  (directory / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  # Another rater labelled the anchors earlier (a restarted server reads them back).
  pairs = label_server.read_pairs(str(directory / "pairs.jsonl"))
  bob = [
    label_server.make_record(pair, "bob", "a", "left", 4, "", 1.7e9 + i, 12.5)
    for i, pair in enumerate(p for p in pairs if p.anchor)
  ]
  preferences.write_preference_jsonl(bob, directory / "labels.jsonl")
  token, _ = label_server.add_rater(str(directory), "alice")
  return {line["pair_id"]: line for line in lines}, token


def _start_server(directory, log_path):
  log = open(log_path, "w")
  process = subprocess.Popen(
    [sys.executable, "-m", "experiments.label_server", f"--queue={directory}", "--port=0"],
    cwd=ROOT,
    stdout=log,
    stderr=subprocess.STDOUT,
    env={**os.environ, "PYTHONUNBUFFERED": "1"},
  )
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    match = re.search(r"Listening on (http://127\.0\.0\.1:\d+)/", open(log_path).read())
    if match:
      return process, match.group(1)
    if process.poll() is not None:
      break
    time.sleep(0.1)
  process.kill()
  raise AssertionError(f"the server did not start:\n{open(log_path).read()}")


def _screenshot(page, path):
  """The page down to the end of its content, at the viewport's width."""
  bottom = page.evaluate("document.querySelector('main').getBoundingClientRect().bottom")
  page.screenshot(path=path, clip={"x": 0, "y": 0, "width": 1100, "height": bottom + 8})


def _expected_record(pair, left_text, right_text, key, confidence, comment):
  left = "a" if left_text == pair["response_a"] else "b"
  if key == "t":
    chosen, rejected, tie = pair["response_a"], pair["response_b"], True
    shown_order = "chosen_first" if left == "a" else "rejected_first"
  elif key in ("a", "ArrowLeft"):
    chosen, rejected, tie, shown_order = left_text, right_text, False, "chosen_first"
  else:
    chosen, rejected, tie, shown_order = right_text, left_text, False, "rejected_first"
  return {
    "prompt": pair["prompt"],
    "chosen": chosen,
    "rejected": rejected,
    "tie": tie,
    "confidence": confidence,
    "rater_id": "alice",
    "pair_id": pair["pair_id"],
    "anchor": pair.get("anchor", False),
    "shown_order": shown_order,
    "comment": comment,
    "left": left,
  }


def test_label_20_items_with_the_keyboard(tmp_path):
  sync_playwright = _sync_playwright()
  directory = tmp_path / "queue"
  pairs, token = _write_queue(directory)
  process, base = _start_server(directory, tmp_path / "server.log")
  pressed = {}
  try:
    with sync_playwright() as playwright:
      browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
      page = browser.new_page(viewport={"width": 1100, "height": 820})
      page.set_default_timeout(TIMEOUT_MS)
      errors_seen = []
      page.on("pageerror", lambda error: errors_seen.append(str(error)))
      page.on("console", lambda m: m.type == "error" and errors_seen.append(m.text))

      assert page.goto(f"{base}/?token=wrong").status == 403
      assert "Unknown rater token" in page.content()
      errors_seen.clear()  # the browser logs the 403 itself
      page.goto(f"{base}/?token={token}")
      page.wait_for_selector("#item:not([hidden])")
      assert page.text_content("#rater") == "alice"
      assert page.text_content("#labelled") == "0" and page.text_content("#left-count") == "24"
      assert page.text_content("#agreement") == "not yet"

      previous, screenshot = None, os.environ.get("RLHF_JAX_SCREENSHOT")
      for i in range(20):
        page.wait_for_function(
          "prev => { const el = document.getElementById('item');"
          " return !el.hidden && el.dataset.pairId && el.dataset.pairId !== prev; }",
          arg=previous,
        )
        pair_id = page.get_attribute("#item", "data-pair-id")
        left_text = page.text_content("#left-text")
        right_text = page.text_content("#right-text")
        pair = pairs[pair_id]
        assert {left_text, right_text} == {pair["response_a"], pair["response_b"]}
        assert page.text_content("#prompt") == pair["prompt"]
        assert page.get_attribute('[data-confidence="3"]', "class") == "on"  # the default
        key = SIDE_KEYS[i % len(SIDE_KEYS)]
        confidence_key = CONFIDENCE_KEYS[i % len(CONFIDENCE_KEYS)]
        page.keyboard.press(key)
        comment = ""
        if i == COMMENT_ITEM:
          page.keyboard.press("c")
          page.keyboard.type(COMMENT)
          page.keyboard.press("Escape")
          comment = COMMENT
          assert page.input_value("#comment") == COMMENT
        if confidence_key:
          page.keyboard.press(confidence_key)
        side = {"a": "left", "ArrowLeft": "left", "t": "tie"}.get(key, "right")
        chosen = page.get_attribute(f'[data-choice="{side}"]', "class")
        assert chosen == "on", (i, key)
        picked = {"left": left_text, "right": right_text}.get(side)
        if screenshot and i >= SCREENSHOT_AFTER and picked in BETTER:
          _screenshot(page, screenshot)
          screenshot = None
        confidence = int(confidence_key or 3)
        pressed[pair_id] = _expected_record(pair, left_text, right_text, key, confidence, comment)
        page.keyboard.press("Enter")
        if i == DOUBLE_ENTER_ITEM:
          page.keyboard.press("Enter")
        previous = pair_id

      page.wait_for_function("() => document.getElementById('labelled').textContent === '20'")
      # A retried request for an item already labelled is answered as a success, not stored.
      last = pressed[previous]
      retry = page.evaluate(
        """async body => {
          const response = await fetch("/api/label", {method: "POST",
            headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
          return [response.status, await response.json()];
        }""",
        {"token": token, "pair_id": previous, "choice": "tie", "left": last["left"]},
      )
      assert retry == [200, {"ok": True, "duplicate": True}]

      assert page.text_content("#left-count") == "4"  # 4 ordinary pairs are still left
      assert "with other raters (4 anchors)" in page.text_content("#agreement")
      assert "with the reference answers (2)" in page.text_content("#agreement")
      assert errors_seen == []
      browser.close()
  finally:
    process.terminate()
    process.wait(timeout=30)

  path = directory / "labels.jsonl"
  lines = path.read_text().splitlines()
  records = [json.loads(line) for line in lines]
  assert [r["rater_id"] for r in records[:4]] == ["bob"] * 4
  mine = records[4:]
  assert len(mine) == 20 and len({r["pair_id"] for r in mine}) == 20
  assert sum(r["anchor"] for r in mine) == 4  # items 5, 10, 15, 20
  assert [r["anchor"] for r in mine].index(True) == 4
  for line, record in enumerate(records[4:], start=5):
    fail = lambda message, field, line=line: errors.DataError(str(path), line, message, field)
    preferences.validate_preference(record, fail)
    expected = pressed[record["pair_id"]]
    assert {k: record[k] for k in expected} == expected, record["pair_id"]
    assert record.get("margin", 0.0) == 0.0
    assert record["seconds_on_item"] >= 0 and record["time"] > 1.7e9
  assert sum(r["tie"] for r in mine) == 3 and sum(bool(r["comment"]) for r in mine) == 1
  assert {r["confidence"] for r in mine} == {1, 2, 3, 4, 5}

  report = label_report.make_report(str(path), min_shared=1)
  assert report["counts"]["records"] == 24 and report["counts"]["raters"] == 2
  assert report["counts"]["anchor_items"] == 4 and report["counts"]["duplicate_labels"] == 0
  alice = report["per_rater"]["alice"]
  assert alice["num_labels"] == 20 and alice["anchor_items"] == 4
  assert math.isfinite(alice["anchor_agreement"])
