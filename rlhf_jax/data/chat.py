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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

ROLES = ("system", "user", "assistant")
ROLE_PREFIX = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
GENERATION_PREFIX = ROLE_PREFIX["assistant"]
TURN_END = "\n"

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
