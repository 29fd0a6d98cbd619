"""Chat records (`messages`): validation and the built-in plain-text chat format.

A chat record holds a list of turns, each `{"role": "system" | "user" | "assistant",
"content": str}`, as in the OpenAI / Hugging Face `messages` convention. Until a
tokenizer brings its own chat template, turns are rendered as plain text, one line per
turn with its role as a prefix:

    System: You are terse.
    User: Review of the blue kettle:
    Assistant: It boils water quickly.

A prompt (for sampling) ends with the user's turn and the generation prefix
`"Assistant: "`, so the policy writes the assistant's answer; the same prefix opens every
assistant turn in SFT data, so a policy fine-tuned on chat records samples in the format it
learned.

    render_prompt([{"role": "user", "content": "Hi"}])  # -> "User: Hi\\nAssistant: "

A tokenizer that ships a chat template (a Hugging Face `tokenizer_config.json`'s Jinja
`chat_template`, or `chat_template.jinja`) brings its own format: `format_for(tokenizer)`
gives a `TemplateFormat` that renders prompts and SFT pieces with it, exactly as
`transformers`' `apply_chat_template` renders them, and `PLAIN` (this module's functions)
otherwise. Both have `render_prompt`, `sft_pieces` and `last_exchange`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from rlhf_jax import errors

ROLES = ("system", "user", "assistant")
ROLE_PREFIX = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
GENERATION_PREFIX = ROLE_PREFIX["assistant"]
TURN_END = "\n"
RENDER_CACHE = 1 << 16  # chat-template renderings kept (`TemplateFormat.render`)

Message = dict[str, str]
Fail = Callable[[str, str | None], Exception]


def _type_name(value: Any) -> str:
  return "null" if value is None else type(value).__name__


def validate_messages(value: Any, fail: Fail, field: str = "messages") -> list[Message]:
  """`value` as a list of {"role", "content"} turns, or the error `fail(message, field)` makes.

  Rules: a non-empty list; each turn an object with a `role` in ROLES and a non-blank string
  `content` (other keys are ignored); a system turn only first.
  """
  if not isinstance(value, Sequence) or isinstance(value, str | bytes) or not value:
    got = repr(value) if isinstance(value, list) else _type_name(value)
    raise fail(f"field {field!r} must be a non-empty list of turns, got {got}", field)
  out = []
  for i, turn in enumerate(value):
    where = f"{field}[{i}]"
    if not isinstance(turn, Mapping):
      raise fail(
        f"{where} must be an object with 'role' and 'content', got {_type_name(turn)}", field
      )
    role, content = turn.get("role"), turn.get("content")
    if role not in ROLES:
      raise fail(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", field)
    if role == "system" and i:
      raise fail(f"{where}: a system turn may only come first", field)
    if not isinstance(content, str) or not content.strip():
      got = repr(content) if isinstance(content, str) else _type_name(content)
      raise fail(f"{where}.content must be a non-empty string, got {got}", field)
    out.append({"role": role, "content": content})
  return out


def render_turn(turn: Mapping[str, str]) -> str:
  """One turn as text: its role prefix, content and TURN_END."""
  return ROLE_PREFIX[turn["role"]] + turn["content"] + TURN_END


def render_prompt(messages: Sequence[Mapping[str, str]]) -> str:
  """The text a policy continues: every turn, then GENERATION_PREFIX.

  The conversation must not end with an assistant turn (that would be an answer, not a
  prompt); `validate_prompt_messages` refuses it with the record's location.
  """
  if messages and messages[-1]["role"] == "assistant":
    raise ValueError("a prompt's messages end with an assistant turn; the policy answers last")
  return "".join(render_turn(t) for t in messages) + GENERATION_PREFIX


def validate_prompt_messages(value: Any, fail: Fail, field: str = "messages") -> list[Message]:
  """`validate_messages`, and the last turn must be the user's (the policy answers it)."""
  messages = validate_messages(value, fail, field)
  if messages[-1]["role"] != "user":
    raise fail(
      f"field {field!r} must end with a user turn for a prompt, got a "
      f"{messages[-1]['role']} turn last",
      field,
    )
  return messages


# ------------------------------------------------------------------------ SFT layout

# What a chat record trains on (`config.data.train_on`): every assistant turn, only the last
# one, or every token of the conversation.
TRAIN_ON = ("assistant", "last", "all")


class Piece(NamedTuple):
  """A run of conversation text that is tokenized on its own.

  Attributes:
    text: the text.
    trained: its tokens are targets of the loss.
    reply: an assistant turn's content: the token layout puts EOS after it (a target when
      the reply is), so the model learns to stop where the turn ends.
  """

  text: str
  trained: bool
  reply: bool


def _last_reply(messages: Sequence[Mapping[str, str]]) -> int:
  for i in range(len(messages) - 1, -1, -1):
    if messages[i]["role"] == "assistant":
      return i
  raise ValueError("the messages have no assistant turn: there is nothing to train on")


def sft_pieces(messages: Sequence[Mapping[str, str]], train_on: str = "assistant") -> list[Piece]:
  """The conversation as SFT pieces: context text and assistant replies, alternating.

  Each context piece is the rendered text up to and including the next GENERATION_PREFIX,
  so the text before a reply is exactly what `render_prompt` gives for the turns before it,
  and a model trained on it answers the prompts RL later gives it in the format it learned.
  Each reply is its own piece (EOS follows it in the token layout); the context after a
  reply starts with TURN_END. For `[user u, assistant a]` the pieces are
  `[render_prompt([user u]), a]`, the layout of a {"prompt", "response"} record.

  Turns after the last assistant reply are left out: SFT teaches replies, and nothing the
  model writes follows them (under "assistant" or "last" they could not change any loss
  term either, as attention is causal), so they would only take room in the row.

  Args:
    messages: validated turns (`validate_messages`) with at least one assistant turn.
    train_on: "assistant" (every reply is trained), "last" (only the last reply), or
      "all" (the context pieces too).

  Raises:
    ValueError: an unknown `train_on`, or no assistant turn.
  """
  if train_on not in TRAIN_ON:
    raise ValueError(f"train_on={train_on!r}; expected one of {', '.join(TRAIN_ON)}")
  last = _last_reply(messages)
  pieces, context = [], ""
  for i, turn in enumerate(messages[: last + 1]):
    if turn["role"] != "assistant":
      context += render_turn(turn)
      continue
    pieces.append(Piece(context + GENERATION_PREFIX, train_on == "all", False))
    pieces.append(Piece(turn["content"], train_on != "last" or i == last, True))
    context = TURN_END
  return pieces


def last_exchange(messages: Sequence[Mapping[str, str]]) -> tuple[str, str]:
  """(prompt, reply): the text before the last assistant reply and that reply's content.

  The prompt is what `render_prompt` gives for the turns before the reply (it may end with
  an earlier assistant turn, which `render_prompt` refuses), the reply what the model is
  trained to answer to it: together the {"prompt", "response"} view of a chat record, used
  to sample from the model in evaluations.
  """
  last = _last_reply(messages)
  prompt = "".join(render_turn(t) for t in messages[:last]) + GENERATION_PREFIX
  return prompt, messages[last]["content"]


def render_chat(messages: Sequence[Mapping[str, str]]) -> str:
  """The whole conversation as text, every turn rendered (e.g. to train a tokenizer on)."""
  return "".join(render_turn(t) for t in messages)


# ------------------------------------------------------------------- chat formats


class PlainFormat:
  """The built-in plain-text format (this module's functions), for tokenizers without a
  chat template."""

  name = "plain"

  @staticmethod
  def render_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    return render_prompt(messages)

  @staticmethod
  def sft_pieces(messages: Sequence[Mapping[str, str]], train_on: str = "assistant") -> list[Piece]:
    return sft_pieces(messages, train_on)

  @staticmethod
  def last_exchange(messages: Sequence[Mapping[str, str]]) -> tuple[str, str]:
    return last_exchange(messages)


PLAIN = PlainFormat()

# Turn contents used to find where a template puts a reply and what ends it.
_PROBE_USER, _PROBE_REPLY = "Question 1?", "Answer 1."


class TemplateFormat:
  """A Jinja chat template, rendered as `transformers`' `apply_chat_template` renders it.

  The environment is the one `transformers` gives templates: a sandbox with `trim_blocks`
  and `lstrip_blocks`, loop controls, `raise_exception`, a `tojson` that does not escape
  HTML, the `{% generation %}` tag, and the tokenizer's special tokens as variables
  (`bos_token`, `eos_token`, ...). `strftime_now` is left out on purpose: templates that
  print today's date (Llama 3.1) then fall back to their fixed default, so a row renders
  the same on every day and a resumed run sees the data an uninterrupted one saw.

  The token layout stays this framework's: BOS is added by the tokenizer layout, so a
  template's leading `bos_token` text is stripped, and a reply is followed by the EOS id,
  so the template must end an assistant turn with `eos_token` (checked here, once).

  Args:
    template: the Jinja source.
    special_tokens: {"bos_token": text, "eos_token": text, ...} as the template sees them.
    bos_text: the BOS text to strip from the start of a rendering ("" when the tokenizer
      adds no BOS).
    eos_text: the text of the EOS token that must end every assistant turn.
    source: where the template comes from, for errors.
  """

  name = "template"

  def __init__(
    self,
    template: str,
    *,
    special_tokens: Mapping[str, str],
    bos_text: str,
    eos_text: str,
    source: str,
  ):
    self.source, self.bos_text, self.eos_text = source, bos_text, eos_text
    self._special = dict(special_tokens)
    self._text = template
    self._compiled = None
    self._checked = False
    # SFT renders every chat record again in every collate (each epoch, each resume):
    # renderings are kept by their turns, so a record's template runs once while it is
    # among the last RENDER_CACHE ones rendered.
    self._cached_render = functools.lru_cache(maxsize=RENDER_CACHE)(self._render)

  def _check_turn_end(self) -> None:
    """Refuses a template whose assistant turns do not end with EOS (checked once)."""
    if self._checked:
      return
    end = self.turn_end()
    if not end.startswith(self.eos_text):
      raise errors.DataError(
        self.source,
        0,
        f"the chat template ends an assistant turn with {end[:40]!r}, not with the "
        f"eos_token {self.eos_text!r}, so a policy trained on it would never learn to stop",
        field="chat_template",
        hint="Set eos_token in tokenizer_config.json to the token that ends an assistant turn.",
      )
    self._checked = True

  def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    """The template's text for `messages`, without a leading BOS text."""
    try:
      key = tuple(tuple(sorted(m.items())) for m in messages)
      hash(key)
    except TypeError:  # a turn holds a list or a dict (tool calls): rendered uncached
      return self._render(tuple(tuple(m.items()) for m in messages), add_generation_prompt)
    return self._cached_render(key, add_generation_prompt)

  def _render(self, turns: tuple[tuple[tuple[str, Any], ...], ...], add_generation_prompt):
    if self._compiled is None:
      self._compiled = _compile(self._text, self.source)
    try:
      text = self._compiled.render(
        messages=[dict(turn) for turn in turns],
        add_generation_prompt=add_generation_prompt,
        **self._special,
      )
    except Exception as error:  # jinja2's TemplateError, or whatever the template raises
      raise errors.DataError(
        self.source, 0, f"the chat template failed to render: {error}", field="chat_template"
      ) from None
    if self.bos_text and text.startswith(self.bos_text):
      text = text[len(self.bos_text) :]
    return text

  def turn_end(self) -> str:
    """The text a template writes after an assistant turn's content (up to the next turn)."""
    user = {"role": "user", "content": _PROBE_USER}
    full = self.render([user, {"role": "assistant", "content": _PROBE_REPLY}], False)
    at = full.rfind(_PROBE_REPLY)
    if at < 0:
      raise errors.DataError(
        self.source, 0, "the chat template does not write the assistant's content",
        field="chat_template",
      )  # fmt: skip
    return full[at + len(_PROBE_REPLY) :]

  def render_prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
    """The turns, then the template's generation prompt (the assistant's turn opener)."""
    if messages and messages[-1]["role"] == "assistant":
      raise ValueError("a prompt's messages end with an assistant turn; the policy answers last")
    return self.render(messages, True)

  def last_exchange(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, str]:
    last = _last_reply(messages)
    return self.render(messages[:last], True), messages[last]["content"]

  def sft_pieces(
    self, messages: Sequence[Mapping[str, str]], train_on: str = "assistant"
  ) -> list[Piece]:
    """As `sft_pieces`, cut from the template's rendering of the conversation.

    The whole conversation up to the last reply is rendered once; for each assistant turn
    the rendering of the turns before it with the generation prompt marks where the reply
    starts, and the first `eos_token` text after that where it ends (that EOS is the
    layout's, added after the reply piece). Whatever the template writes between one EOS
    and the next reply (the rest of the turn end, the next turns, the next opener) is
    context. A template that renders earlier turns differently once later turns follow
    (some drop an earlier turn's reasoning) cannot be cut this way and is an error.
    """
    if train_on not in TRAIN_ON:
      raise ValueError(f"train_on={train_on!r}; expected one of {', '.join(TRAIN_ON)}")
    self._check_turn_end()
    last = _last_reply(messages)
    full = self.render(messages[: last + 1], False)
    pieces, start = [], 0
    for i, turn in enumerate(messages[: last + 1]):
      if turn["role"] != "assistant":
        continue
      opener = self.render(messages[:i], True)
      end = full.find(self.eos_text, len(opener))
      reply = full[len(opener) : end]
      if (
        not full.startswith(opener)
        or len(opener) < start
        or end < 0
        or turn["content"].strip() not in reply
      ):
        raise errors.DataError(
          self.source,
          0,
          f"the chat template renders turn {i} differently when later turns follow (or "
          "does not write its content followed by the eos_token), so the conversation "
          "cannot be cut into context and replies",
          field="chat_template",
        )
      pieces.append(Piece(full[start : len(opener)], train_on == "all", False))
      pieces.append(Piece(reply, train_on != "last" or i == last, True))
      start = end + len(self.eos_text)
    return pieces


def _compile(template: str, source: str):
  """The template compiled in the environment `transformers` gives chat templates."""
  import jinja2
  from jinja2 import ext, nodes
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Generation(ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip

  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[Generation, ext.loopcontrols]
  )
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateError as error:
    raise errors.DataError(
      source, 0, f"the chat template is not valid Jinja: {error}", field="chat_template"
    ) from None


def format_for(tokenizer: Any) -> PlainFormat | TemplateFormat:
  """The chat format of `tokenizer`: its chat template (`tokenizer.chat_format`, a
  Hugging Face tokenizer with one), else the plain format."""
  return getattr(tokenizer, "chat_format", None) or PLAIN


def decode_messages(value: Any) -> list[Message]:
  """Stored turns (a list, or its JSON text as datasets keep it) as a list."""
  if isinstance(value, bytes):
    value = value.decode("utf-8")
  return json.loads(value) if isinstance(value, str) else list(value)
