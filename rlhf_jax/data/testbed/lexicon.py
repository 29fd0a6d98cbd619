"""The testbed language's lexicon and grammar: units with hidden attributes, parsing, rendering.

Texts are reviews of items. A prompt names an item ("Review of the blue kettle:"); an item is
a colour and a category noun. A response is one or more sentences from this grammar
(lowercase tokens; a sentence's first word and "I" are capitalised when rendered):

  response  := sentence (" " sentence)*
  sentence  := [opener ","] | [plain_opener]  subject vp (conj vp)* "."
  subject   := "it" | "this one" | ("the" | "this") [colour] noun
  vp        := copula intensifier* evaluation     "looks really great"
             | feature                            "boils water quickly"   (specific)
             | vague                              "does the job"          (vague)
  conj      := "and" | "but" | "and also"

The lexicon is a set of *units*, each one word or a fixed phrase, with hidden attributes:
`sentiment` (signed strength), `specific` (a concrete claim about one category of item) and
`category` (which item category a feature fits; a feature of another category is an
off-item claim). Intensifiers scale the next evaluation's sentiment; openers are filler.
The lexicon is fixed (about 300 words); the language config only chooses which part of it
the generator uses, so the gold reward never depends on generator knobs.

Parsing has two independent halves, so arbitrary strings never fail:
  * `segment` splits the tokens into units by greedy longest match; a token that starts no
    unit becomes an "unknown" unit. The gold reward reads attributes from these units.
  * `is_well_formed` checks the whole text against the grammar (a regular language, compiled
    to one regex over the lowercase tokens) and that it is rendered canonically.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

# ----------------------------------------------------------------------------- categories
# Category noun -> feature phrases that fit it, with their sentiment. Positive first, then
# negative; the generator takes the first `features_per_category` of each sign.
FEATURES: dict[str, dict[str, float]] = {
  "kettle": {
    "boils water quickly": 1.5,
    "heats up in seconds": 1.5,
    "pours without dripping": 1.0,
    "keeps water hot": 1.0,
    "switches off by itself": 1.0,
    "leaks at the base": -2.0,
    "whistles too loudly": -1.0,
    "leaves a metal taste": -1.5,
  },
  "lamp": {
    "glows warmly": 1.0,
    "lights the whole room": 1.5,
    "dims smoothly": 1.0,
    "gives soft light for reading": 1.5,
    "switches on with a touch": 1.0,
    "flickers at night": -1.5,
    "buzzes when dimmed": -1.0,
    "tips over easily": -1.5,
  },
  "chair": {
    "supports my back well": 1.5,
    "stays comfortable for hours": 1.5,
    "swivels smoothly": 1.0,
    "has soft padding": 1.0,
    "adjusts to any height": 1.0,
    "wobbles on the floor": -1.5,
    "creaks when i sit": -1.0,
    "hurts my back": -2.0,
  },
  "backpack": {
    "keeps my laptop safe": 1.5,
    "sits comfortably on my shoulders": 1.5,
    "holds all my books": 1.0,
    "has many pockets": 1.0,
    "zips open smoothly": 1.0,
    "rips at the seams": -2.0,
    "digs into my shoulders": -1.5,
    "gets soaked in the rain": -1.5,
  },
  "umbrella": {
    "keeps me dry": 1.5,
    "stands up to strong wind": 1.5,
    "opens with one click": 1.0,
    "folds up small": 1.0,
    "dries quickly": 1.0,
    "flips inside out": -1.5,
    "drips on my shoes": -1.0,
    "jams when closing": -1.5,
  },
  "knife": {
    "cuts tomatoes cleanly": 1.5,
    "stays sharp for months": 1.5,
    "feels balanced in my hand": 1.0,
    "slices bread easily": 1.0,
    "has a firm grip": 1.0,
    "goes dull fast": -1.5,
    "rusts after washing": -1.5,
    "slips in my hand": -2.0,
  },
  "speaker": {
    "has deep bass": 1.5,
    "lasts all day on a charge": 1.5,
    "plays music loudly": 1.0,
    "pairs with my phone instantly": 1.0,
    "fills the room with sound": 1.0,
    "crackles at high volume": -1.5,
    "drops the connection": -1.5,
    "sounds tinny": -1.0,
  },
  "jacket": {
    "keeps me warm": 1.5,
    "blocks the wind": 1.5,
    "fits well in the shoulders": 1.0,
    "has deep pockets": 1.0,
    "breathes on long walks": 1.0,
    "shrinks in the wash": -2.0,
    "tears at the sleeve": -1.5,
    "traps sweat": -1.0,
  },
}
CATEGORIES: tuple[str, ...] = tuple(FEATURES)
COLOURS = ("blue", "red", "green", "black", "white", "grey", "yellow", "orange")

# ----------------------------------------------------------------------------- generic units
# Evaluations (after a copula): vague, any item. Sentiment is signed strength.
EVALUATIONS: dict[str, float] = {
  "perfect": 3.0,
  "amazing": 3.0,
  "excellent": 2.5,
  "wonderful": 2.5,
  "superb": 2.5,
  "great": 2.0,
  "impressive": 2.0,
  "lovely": 1.5,
  "reliable": 1.5,
  "good": 1.0,
  "nice": 1.0,
  "solid": 1.0,
  "handy": 1.0,
  "pleasant": 1.0,
  "fine": 0.0,
  "okay": 0.0,
  "alright": 0.0,
  "ordinary": 0.0,
  "average": -0.25,
  "mediocre": -0.75,
  "cheap": -1.0,
  "bad": -1.5,
  "poor": -1.5,
  "flimsy": -1.5,
  "annoying": -1.5,
  "disappointing": -2.0,
  "useless": -2.5,
  "terrible": -3.0,
  "awful": -3.0,
}
# Vague verb phrases: sentiment without a concrete claim.
VAGUE: dict[str, float] = {
  "is worth the money": 1.5,
  "works well": 1.0,
  "does the job": 0.5,
  "gets the job done": 0.5,
  "does what it says": 0.5,
  "works as expected": 0.5,
  "is what it is": 0.0,
  "does its thing": 0.0,
  "could be better": -0.75,
  "is not worth the money": -1.5,
  "stopped working": -2.0,
  "broke after a week": -2.0,
}
# Multipliers applied to the sentiment of the next evaluation.
INTENSIFIERS: dict[str, float] = {
  "very": 1.5,
  "really": 1.5,
  "so": 1.5,
  "truly": 1.75,
  "extremely": 2.0,
  "quite": 1.25,
  "pretty": 1.25,
  "fairly": 1.1,
  "somewhat": 0.75,
  "a bit": 0.6,
  "a little": 0.6,
}
COPULAS = ("is", "looks", "feels", "seems")
CONJUNCTIONS = ("and also", "and", "but")
# Openers followed by a comma, and openers that run straight into the clause.
COMMA_OPENERS = (
  "overall",
  "honestly",
  "to be honest",
  "in short",
  "all in all",
  "in my opinion",
  "after a month",
  "for the price",
)
PLAIN_OPENERS = ("i think", "i feel", "i would say", "i find")
PUNCTUATION = (".", ",")
# Subject words; "the"/"this" combine with colour and noun units.
SUBJECT_WORDS = ("it", "this one", "the", "this")


@dataclasses.dataclass(frozen=True)
class Unit:
  """One lexicon entry: a word or fixed phrase and its hidden attributes.

  kind: one of feature, evaluation, vague, intensifier, copula, conjunction, opener,
    subject, colour, noun, punctuation, unknown.
  """

  text: str
  kind: str
  sentiment: float = 0.0
  specific: bool = False
  category: str | None = None
  multiplier: float = 1.0


def _build_units() -> dict[str, Unit]:
  units: dict[str, Unit] = {}

  def add(unit: Unit) -> None:
    # Every phrase has exactly one meaning, so segmentation is unambiguous.
    assert unit.text not in units, unit.text
    units[unit.text] = unit

  for category, features in FEATURES.items():
    add(Unit(category, "noun", category=category))
    for text, sentiment in features.items():
      add(Unit(text, "feature", sentiment, specific=True, category=category))
  for colour in COLOURS:
    add(Unit(colour, "colour"))
  for text, sentiment in EVALUATIONS.items():
    add(Unit(text, "evaluation", sentiment))
  for text, sentiment in VAGUE.items():
    add(Unit(text, "vague", sentiment))
  for text, multiplier in INTENSIFIERS.items():
    add(Unit(text, "intensifier", multiplier=multiplier))
  for kind, words in (
    ("copula", COPULAS),
    ("conjunction", CONJUNCTIONS),
    ("opener", COMMA_OPENERS + PLAIN_OPENERS),
    ("subject", SUBJECT_WORDS),
    ("punctuation", PUNCTUATION),
  ):
    for text in words:
      add(Unit(text, kind))
  return units


UNITS: dict[str, Unit] = _build_units()
VOCABULARY: frozenset[str] = frozenset(w for text in UNITS for w in text.split())
_MAX_UNIT_WORDS = max(len(text.split()) for text in UNITS)

# ----------------------------------------------------------------------------- text <-> tokens
_TOKEN_RE = re.compile(r"[A-Za-z]+|\S")


def tokenize(text: str) -> list[str]:
  """Lowercase tokens: runs of letters, and every other non-space character on its own."""
  return [t.lower() for t in _TOKEN_RE.findall(text)]


def num_words(text: str) -> int:
  """Length in words: tokens other than "." and ","."""
  return sum(1 for t in tokenize(text) if t not in PUNCTUATION)


def render(tokens: Sequence[str]) -> str:
  """Canonical text of lowercase tokens: sentence-initial capitals, "I", no space before . ,"""
  out: list[str] = []
  sentence_start = True
  for token in tokens:
    word = token.capitalize() if sentence_start or token == "i" else token
    if token in PUNCTUATION and out:
      out[-1] += token
    else:
      out.append(word)
    sentence_start = token == "."
  return " ".join(out)


def segment(tokens: Sequence[str]) -> list[Unit]:
  """Greedy longest-match split of lowercase tokens into lexicon units.

  A token that starts no unit becomes Unit(token, "unknown"). Never fails.
  """
  units: list[Unit] = []
  i = 0
  while i < len(tokens):
    for width in range(min(_MAX_UNIT_WORDS, len(tokens) - i), 0, -1):
      unit = UNITS.get(" ".join(tokens[i : i + width]))
      if unit is not None:
        units.append(unit)
        i += width
        break
    else:
      units.append(Unit(tokens[i], "unknown"))
      i += 1
  return units


# ----------------------------------------------------------------------------- grammar
def _alternation(phrases) -> str:
  # Longest first only for readability of the pattern; fullmatch backtracks anyway.
  return "(?:" + "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True)) + ")"


@functools.cache
def _grammar() -> re.Pattern[str]:
  """The response grammar as one regex over space-joined lowercase tokens."""
  features = [u.text for u in UNITS.values() if u.kind == "feature"]
  subject = f"(?:it|this one|(?:the|this) (?:{_alternation(COLOURS)} )?{_alternation(CATEGORIES)})"
  evaluation_vp = (
    f"{_alternation(COPULAS)}(?: {_alternation(INTENSIFIERS)})* {_alternation(EVALUATIONS)}"
  )
  vp = f"(?:{evaluation_vp}|{_alternation(features)}|{_alternation(VAGUE)})"
  opener = f"(?:{_alternation(COMMA_OPENERS)} , |{_alternation(PLAIN_OPENERS)} )"
  sentence = f"{opener}?{subject} {vp}(?: {_alternation(CONJUNCTIONS)} {vp})* \\."
  return re.compile(f"{sentence}(?: {sentence})*")


def is_grammatical(tokens: Sequence[str]) -> bool:
  """Whether lowercase tokens form a response of the grammar (ignores case and spacing)."""
  return bool(tokens) and _grammar().fullmatch(" ".join(tokens)) is not None


def is_well_formed(text: str) -> bool:
  """Grammatical, and written exactly as `render` writes it (up to runs of whitespace)."""
  tokens = tokenize(text)
  return is_grammatical(tokens) and " ".join(text.split()) == render(tokens)


# ----------------------------------------------------------------------------- prompts
_PROMPT_ITEM_RE = re.compile(r"\bthe ([a-z]+) ([a-z]+):$")


def parse_prompt(prompt: str) -> tuple[str, str]:
  """(colour, category) of the item a prompt names: "Review of the blue kettle:" -> (blue, kettle).

  Raises ValueError if the prompt does not end in "the <colour> <category>:".
  """
  match = _PROMPT_ITEM_RE.search(" ".join(prompt.lower().split()))
  if match is None or match[1] not in COLOURS or match[2] not in FEATURES:
    raise ValueError(f"Prompt {prompt!r} does not end in 'the <colour> <category>:'.")
  return match[1], match[2]
