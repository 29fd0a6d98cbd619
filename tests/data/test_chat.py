"""Tests for rlhf_jax.data.chat's SFT layout: pieces, the last exchange, the rendered chat."""

import pytest

from rlhf_jax.data import chat
from rlhf_jax.data.chat import Piece

SYSTEM = {"role": "system", "content": "Be terse."}
U1 = {"role": "user", "content": "Review of the lamp:"}
A1 = {"role": "assistant", "content": "It glows."}
U2 = {"role": "user", "content": "And the kettle?"}
A2 = {"role": "assistant", "content": "It boils."}


def test_single_turn_pieces_are_the_rl_prompt_then_the_reply():
  pieces = chat.sft_pieces([U1, A1])
  assert pieces == [Piece(chat.render_prompt([U1]), False, False), Piece("It glows.", True, True)]
  assert pieces[0].text == "User: Review of the lamp:\nAssistant: "


@pytest.mark.parametrize(
  ("train_on", "trained"),
  [
    ("assistant", [False, True, False, True]),
    ("last", [False, False, False, True]),
    ("all", [True, True, True, True]),
  ],
)
def test_multi_turn_pieces_and_what_each_mode_trains(train_on, trained):
  pieces = chat.sft_pieces([SYSTEM, U1, A1, U2, A2], train_on)
  assert [p.text for p in pieces] == [
    "System: Be terse.\nUser: Review of the lamp:\nAssistant: ",
    "It glows.",
    "\nUser: And the kettle?\nAssistant: ",
    "It boils.",
  ]
  assert [p.reply for p in pieces] == [False, True, False, True]
  assert [p.trained for p in pieces] == trained
  # Up to each reply the pieces read as the RL prompt of the turns before it (the context
  # after a reply starts with the TURN_END that closes it).
  assert "".join(p.text for p in pieces[:3]) == chat.render_prompt([SYSTEM, U1, A1, U2])


def test_turns_after_the_last_reply_are_left_out_and_replies_may_follow_each_other():
  pieces = chat.sft_pieces([U1, A1, A2, U2])
  assert [p.text for p in pieces] == [
    chat.render_prompt([U1]),
    "It glows.",
    "\nAssistant: ",
    "It boils.",
  ]
  assert chat.sft_pieces([A1]) == [
    Piece("Assistant: ", False, False),
    Piece("It glows.", True, True),
  ]


def test_no_reply_or_unknown_mode_is_an_error():
  with pytest.raises(ValueError, match="no assistant turn"):
    chat.sft_pieces([SYSTEM, U1])
  with pytest.raises(ValueError, match="train_on='every'"):
    chat.sft_pieces([U1, A1], "every")


def test_last_exchange_and_render_chat():
  assert chat.last_exchange([U1, A1, U2, A2, U1]) == (chat.render_prompt([U1, A1, U2]), "It boils.")
  # Consecutive replies: the prompt ends with the earlier reply (render_prompt refuses that).
  assert chat.last_exchange([U1, A1, A2]) == (
    "User: Review of the lamp:\nAssistant: It glows.\nAssistant: ",
    "It boils.",
  )
  assert chat.render_chat([U1, A1]) == "User: Review of the lamp:\nAssistant: It glows.\n"
