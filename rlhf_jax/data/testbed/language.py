"""The seeded generator of the testbed language: items, prompts, responses, the SFT corpus.

    lang = Language(testbed.default_config().language)
    rng = np.random.default_rng(0)
    prompt = lang.prompts("train", 1, rng)[0]     # "Review of the blue kettle:"
    lang.sample_response(prompt, rng)             # "It boils water quickly and looks great."

Items are (colour, category): category k uses the colours k, k+1, ... (mod 8) in
lexicon.COLOURS, `items_per_category` of them; the last `eval_items_per_category` of each
category are held out as the eval split, so eval prompts name unseen colour-noun pairs.

A response is drawn in a *style* (weights in config.language.style_weights): every clause
picks a kind of verb phrase from the style's mix, so the corpus covers positive, negative,
neutral, vague and specific, on-item and off-item, repetitive and plain text, 3 to ~25
words. Every generated response is well formed (lexicon.is_well_formed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

from rlhf_jax.data.testbed import lexicon

PROMPT_TEMPLATES = (
  "Review of the {item}:",
  "A review of the {item}:",
  "My review of the {item}:",
  "Thoughts on the {item}:",
  "What I think of the {item}:",
)
SPLITS = ("train", "eval")

# Kinds of verb phrase a clause can be, and each style's mix of them.
_STYLE_MIX: dict[str, dict[str, float]] = {
  "positive_specific": {"pos_feature": 0.6, "pos_eval": 0.3, "pos_vague": 0.1},
  "positive_vague": {"pos_eval": 0.6, "pos_vague": 0.4},
  "neutral": {"neutral_eval": 0.6, "neutral_vague": 0.4},
  "negative": {"neg_feature": 0.4, "neg_eval": 0.4, "neg_vague": 0.2},
  "mixed": {"pos_feature": 0.25, "pos_eval": 0.25, "neg_feature": 0.25, "neg_eval": 0.25},
  # One clause is made off-item below; the rest reads like positive_specific.
  "off_item": {"pos_feature": 0.6, "pos_eval": 0.3, "pos_vague": 0.1},
  # A clause, an intensifier or a sentence is repeated below.
  "repetitive": {"pos_eval": 0.5, "pos_feature": 0.3, "pos_vague": 0.2},
}
STYLES = tuple(_STYLE_MIX)
# Units a writer avoids repeating (the gold reward's repetition term counts the same ones).
_CONTENT_KINDS = frozenset({"evaluation", "vague", "feature", "intensifier"})

_NEGATIVE_INTENSIFIERS = ("a bit", "a little", "somewhat", "quite", "really", "very")
_POSITIVE_INTENSIFIERS = ("very", "really", "so", "truly", "extremely", "quite", "pretty")


@dataclasses.dataclass(frozen=True)
class Item:
  """An item under review: a colour and a category noun."""

  colour: str
  category: str

  @property
  def name(self) -> str:
    return f"{self.colour} {self.category}"


def _choice(rng: np.random.Generator, options: Sequence):
  return options[int(rng.integers(len(options)))]


def _weighted_choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
  names = list(weights)
  p = np.array([weights[n] for n in names], dtype=np.float64)
  return names[int(rng.choice(len(names), p=p / p.sum()))]


class Language:
  """The generator, built from config.language; all randomness comes from the rng passed in."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    if not 1 <= config.num_categories <= len(lexicon.CATEGORIES):
      raise ValueError(f"num_categories={config.num_categories}; expected 1..8.")
    if not 1 <= config.items_per_category <= len(lexicon.COLOURS):
      raise ValueError(f"items_per_category={config.items_per_category}; expected 1..8.")
    if not 0 <= config.eval_items_per_category < config.items_per_category:
      raise ValueError("eval_items_per_category must be in [0, items_per_category).")
    if config.features_per_category < 1:
      raise ValueError(f"features_per_category={config.features_per_category}; need >= 1.")
    unknown = set(config.style_weights) - set(STYLES)
    if unknown:
      raise ValueError(f"Unknown styles {sorted(unknown)}; expected some of {STYLES}.")
    weights = list(dict(config.style_weights).values())
    if min(weights, default=-1) < 0 or sum(weights) <= 0:
      raise ValueError(f"style_weights={dict(config.style_weights)}; need >= 0, not all 0.")
    self.categories = lexicon.CATEGORIES[: config.num_categories]
    self.items: dict[str, list[Item]] = {"train": [], "eval": []}
    n_train = config.items_per_category - config.eval_items_per_category
    for k, category in enumerate(self.categories):
      for j in range(config.items_per_category):
        colour = lexicon.COLOURS[(k + j) % len(lexicon.COLOURS)]
        self.items["train" if j < n_train else "eval"].append(Item(colour, category))
    self.features: dict[str, dict[str, list[str]]] = {}
    for category, features in lexicon.FEATURES.items():
      pos = [t for t, s in features.items() if s > 0][: config.features_per_category]
      neg = [t for t, s in features.items() if s < 0][: config.features_per_category]
      self.features[category] = {"pos": pos, "neg": neg}
    self.evaluations = {
      "pos": [t for t, s in lexicon.EVALUATIONS.items() if s > 0],
      "neg": [t for t, s in lexicon.EVALUATIONS.items() if s < 0],
      "neutral": [t for t, s in lexicon.EVALUATIONS.items() if s == 0],
    }
    self.vague = {
      "pos": [t for t, s in lexicon.VAGUE.items() if s > 0],
      "neg": [t for t, s in lexicon.VAGUE.items() if s < 0],
      "neutral": [t for t, s in lexicon.VAGUE.items() if s == 0],
    }

  # --------------------------------------------------------------------------- prompts
  def prompts(self, split: str, n: int, rng: np.random.Generator) -> list[str]:
    """n prompts naming items of `split` ("train" or "eval"), drawn with replacement."""
    if split not in SPLITS:
      raise ValueError(f"split={split!r}; expected one of {SPLITS}.")
    items = self.items[split]
    if not items:
      raise ValueError(f"The {split!r} split has no items (eval_items_per_category=0?).")
    return [_choice(rng, PROMPT_TEMPLATES).format(item=_choice(rng, items).name) for _ in range(n)]

  # --------------------------------------------------------------------------- responses
  def sample_style(self, rng: np.random.Generator) -> str:
    return _weighted_choice(rng, dict(self.config.style_weights))

  def sample_response(self, prompt: str, rng: np.random.Generator, style: str | None = None) -> str:
    """One well-formed response to `prompt` in `style` (drawn from the weights if None)."""
    colour, category = lexicon.parse_prompt(prompt)
    item = Item(colour, category)
    style = style or self.sample_style(rng)
    if style not in _STYLE_MIX:
      raise ValueError(f"style={style!r}; expected one of {STYLES}.")
    cfg = self.config
    num_sentences = 1
    while num_sentences < cfg.max_sentences and rng.random() < cfg.second_sentence_prob:
      num_sentences += 1
    sentences = []
    for _ in range(num_sentences):
      num_clauses = 1
      while num_clauses < cfg.max_clauses and rng.random() < cfg.extra_clause_prob:
        num_clauses += 1
      kinds = [_weighted_choice(rng, _STYLE_MIX[style]) for _ in range(num_clauses)]
      if style == "positive_specific" and not sentences:
        kinds[0] = "pos_feature"  # at least one specific claim, true to the name
      sentences.append(_Sentence(self._subject(item, rng), kinds, []))
    if style == "off_item":
      sentence = sentences[int(rng.integers(len(sentences)))]
      if rng.random() < 0.3:
        other = self._other_item(item, rng)
        # Wrong colour must be said to be wrong; a wrong category shows in the noun.
        sentence.subject = self._subject(other, rng, colour=other.category == item.category)
      else:
        sentence.kinds[int(rng.integers(len(sentence.kinds)))] = "off_feature"
    # Apart from the repetitive style, nobody writes the same word or phrase twice.
    used: set[str] = set()
    for sentence in sentences:
      sentence.phrases = [self._fresh_verb_phrase(k, item, rng, used) for k in sentence.kinds]
    if style == "repetitive":
      sentences = self._repeat(sentences, rng)

    tokens: list[str] = []
    for sentence in sentences:
      if rng.random() < cfg.opener_prob:
        opener = _choice(rng, lexicon.COMMA_OPENERS + lexicon.PLAIN_OPENERS)
        if opener not in used:
          used.add(opener)
          tokens += opener.split() + ([","] if opener in lexicon.COMMA_OPENERS else [])
      tokens += sentence.subject.split()
      for i, phrase in enumerate(sentence.phrases):
        if i:
          # "but" where the sentiment turns, as people write.
          turns = _sign(sentence.kinds[i]) * _sign(sentence.kinds[i - 1]) < 0
          tokens += ["but"] if turns else _choice(rng, (["and"], ["and"], ["and", "also"]))
        tokens += phrase.split()
      tokens.append(".")
    return lexicon.render(tokens)

  def _subject(self, item: Item, rng: np.random.Generator, colour: bool | None = None) -> str:
    """ "it", "this one", or the item named; colour=None draws it, a bool forces a name."""
    if colour is None and rng.random() >= self.config.named_subject_prob:
      return "it" if rng.random() < 0.8 else "this one"
    determiner = "the" if rng.random() < 0.7 else "this"
    if colour is None:
      colour = rng.random() < 0.4
    return f"{determiner} {item.colour + ' ' if colour else ''}{item.category}"

  def _other_item(self, item: Item, rng: np.random.Generator) -> Item:
    if rng.random() < 0.5:  # same category, wrong colour
      colours = [c for c in lexicon.COLOURS if c != item.colour]
      return Item(_choice(rng, colours), item.category)
    others = [c for c in lexicon.CATEGORIES if c != item.category]
    return Item(item.colour, _choice(rng, others))

  def _fresh_verb_phrase(
    self, kind: str, item: Item, rng: np.random.Generator, used: set[str], tries: int = 8
  ) -> str:
    """A verb phrase sharing no content unit with `used` if one is found in a few tries."""
    for _ in range(tries):
      phrase = self._verb_phrase(kind, item, rng)
      content = {u.text for u in lexicon.segment(phrase.split()) if u.kind in _CONTENT_KINDS}
      if not content & used:
        break
    used.update(content)
    return phrase

  def _verb_phrase(self, kind: str, item: Item, rng: np.random.Generator) -> str:
    polarity, what = kind.split("_")
    if what == "feature":
      category = item.category
      if polarity == "off":
        category = _choice(rng, [c for c in lexicon.CATEGORIES if c != category])
        polarity = "pos" if rng.random() < 0.7 else "neg"
      return _choice(rng, self.features[category][polarity])
    if what == "vague":
      return _choice(rng, self.vague[polarity])
    words = [_choice(rng, lexicon.COPULAS)]
    if polarity != "neutral" and rng.random() < self.config.intensifier_prob:
      pool = _POSITIVE_INTENSIFIERS if polarity == "pos" else _NEGATIVE_INTENSIFIERS
      words.append(_choice(rng, pool))
    words.append(_choice(rng, self.evaluations[polarity]))
    return " ".join(words)

  def _repeat(self, sentences: list[_Sentence], rng: np.random.Generator) -> list[_Sentence]:
    """Repeats something: a clause, an intensifier, or the whole first sentence."""
    how = rng.random()
    if how < 0.4:
      sentence = _choice(rng, sentences)
      i = int(rng.integers(len(sentence.phrases)))
      times = int(rng.integers(2, 4))
      sentence.kinds = [sentence.kinds[i]] * times
      sentence.phrases = [sentence.phrases[i]] * times
    elif how < 0.7:
      sentence = sentences[0]
      word = _choice(rng, ("really", "very", "so"))
      words = [_choice(rng, lexicon.COPULAS)] + [word] * int(rng.integers(2, 5))
      sentence.kinds[0] = "pos_eval"
      sentence.phrases[0] = " ".join([*words, _choice(rng, self.evaluations["pos"])])
    else:
      first = sentences[0]
      sentences = [first, _Sentence(first.subject, list(first.kinds), list(first.phrases))]
    return sentences


@dataclasses.dataclass
class _Sentence:
  """A sentence being built: its subject, and per clause the kind and the verb phrase."""

  subject: str
  kinds: list[str]
  phrases: list[str]


def _sign(kind: str) -> int:
  return {"pos": 1, "neg": -1}.get(kind.split("_")[0], 0)
