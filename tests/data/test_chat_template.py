"""Chat templates (`chat.TemplateFormat`): rendered as transformers renders them, cut into
SFT pieces, and applied to prompt, SFT and preference files through the tokenizer."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from rlhf_jax import errors
from rlhf_jax.data import chat, loader, pairs, preferences, prompts
from rlhf_jax.hf.tokenizer import HfTokenizer

FIXTURE = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "hf", "qwen2"
)
SYSTEM = {"role": "system", "content": "Be terse."}
U1 = {"role": "user", "content": "Review of the lamp:"}
A1 = {"role": "assistant", "content": "It glows."}
U2 = {"role": "user", "content": "And the kettle?"}
A2 = {"role": "assistant", "content": " It boils.  "}  # spaces a template may trim

# Templates written in the styles models ship (the fixture's own is a fourth).
CHATML = (  # Qwen2.5 style: a default system turn, <|im_start|>role ... <|im_end|>
  "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
  "<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
  "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HEADERS = (  # Llama 3 style: BOS text first, trimmed contents, a header per turn
  "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
  "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
  "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TURNS = (  # Gemma style: no system role, <end_of_turn> ends turns while eos is <eos>
  "{{ bos_token }}{% for m in messages %}"
  "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
  "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
  "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SPECIALS = {
  CHATML: ("<|endoftext|>", "<|im_end|>", ["<|im_start|>", "<|endoftext|>"]),
  HEADERS: ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
  TURNS: ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>", "<pad>"]),
}


def make_tokenizer(directory, template: str, generation_eos=None) -> str:
  """A tokenizer directory with `template` and its special tokens (a tiny BPE)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  bos, eos, extra = SPECIALS[template]
  specials = [bos, eos, *extra] + (["<pad>"] if "<pad>" not in extra else [])
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(["Review of the lamp: it glows. And the kettle? It boils."] * 4, trainer)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {"bos_token": bos, "eos_token": eos, "pad_token": "<pad>", "chat_template": template}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  if generation_eos is not None:
    ids = [tok.token_to_id(t) for t in generation_eos]
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
      json.dump({"eos_token_id": ids}, f)
  return str(directory)


CONVERSATIONS = [[U1, A1], [SYSTEM, U1, A1, U2, A2], [U1, A1, U2, A2]]


@pytest.mark.parametrize("template", ["fixture", CHATML, HEADERS, TURNS])
def test_renders_as_transformers_apply_chat_template(template, tmp_path):
  transformers = pytest.importorskip("transformers")
  directory = FIXTURE if template == "fixture" else make_tokenizer(tmp_path, template)
  ours = HfTokenizer(directory)
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  bos = ours.id_to_piece(ours.bos_id) if ours.bos_id >= 0 else ""
  for messages in CONVERSATIONS:
    if template == TURNS and messages[0]["role"] == "system":
      continue
    for prompt_turns, generation in ((messages[:-1], True), (messages, False)):
      expected = theirs.apply_chat_template(
        prompt_turns, tokenize=False, add_generation_prompt=generation
      )
      # The layout adds BOS itself, so a template's BOS text is left out of the rendering.
      assert ours.chat_format.render(prompt_turns, generation) == expected.removeprefix(bos)


@pytest.mark.parametrize("template", ["fixture", CHATML, HEADERS, TURNS])
@pytest.mark.parametrize("train_on", chat.TRAIN_ON)
def test_pieces_are_the_rendering_cut_at_replies_and_eos(template, train_on, tmp_path):
  """Context, reply, EOS, context, reply, EOS: joined (with the EOS text) the pieces are the
  template's rendering up to the last reply's EOS; replies are the trained pieces."""
  generation_eos = ["<eos>", "<end_of_turn>"] if template == TURNS else None
  directory = (
    FIXTURE if template == "fixture" else make_tokenizer(tmp_path, template, generation_eos)
  )
  tok = HfTokenizer(directory)
  fmt = tok.chat_format
  messages = [U1, A1, U2, A2]
  pieces = fmt.sft_pieces(messages, train_on)
  eos = tok.id_to_piece(tok.eos_id)
  joined = "".join(p.text + (eos if p.reply else "") for p in pieces)
  full = fmt.render(messages, False)
  assert full.startswith(joined) and full[len(joined) :].strip() == ""
  replies = [p.text for p in pieces if p.reply]
  assert [r.strip() for r in replies] == [A1["content"], A2["content"].strip()]
  assert pieces[0].text == fmt.render_prompt([U1])  # the prompt RL later asks
  trained = [p.trained for p in pieces]
  expected = {"assistant": [False, True, False, True], "last": [False, False, False, True],
              "all": [True, True, True, True]}[train_on]  # fmt: skip
  assert trained == expected
  assert fmt.last_exchange(messages) == (fmt.render_prompt(messages[:3]), A2["content"])


def test_a_template_ending_turns_with_another_generation_eos_makes_it_the_eos(tmp_path):
  """Gemma: eos_token is <eos>, turns end with <end_of_turn>, generation_config lists both."""
  directory = make_tokenizer(tmp_path / "a", TURNS, ["<eos>", "<end_of_turn>"])
  tok = HfTokenizer(directory)
  assert tok.id_to_piece(tok.eos_id) == "<end_of_turn>"
  # Without that listing the template cannot be trained on: one line names it.
  tok = HfTokenizer(make_tokenizer(tmp_path / "b", TURNS))
  assert tok.id_to_piece(tok.eos_id) == "<eos>"
  tok.chat_format.render_prompt([U1])  # prompts need no EOS
  with pytest.raises(errors.DataError, match=r"tokenizer_config\.json: the chat template ends an "
                     r"assistant turn with '<end_of_turn>"):  # fmt: skip
    tok.chat_format.sft_pieces([U1, A1])


def test_template_errors_name_the_file(tmp_path):
  tok = HfTokenizer(make_tokenizer(tmp_path / "a", TURNS, ["<eos>", "<end_of_turn>"]))
  with pytest.raises(errors.DataError, match=r"tokenizer_config\.json: the chat template failed "
                     r"to render: System role not supported"):  # fmt: skip
    tok.chat_format.render_prompt([SYSTEM, U1])
  broken = make_tokenizer(tmp_path / "b", CHATML)
  with open(os.path.join(broken, "tokenizer_config.json")) as f:
    config = json.load(f)
  config["chat_template"] = "{% for m in messages %}{{ m['content'] }"
  with open(os.path.join(broken, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  tok = HfTokenizer(broken)  # reading the tokenizer does not need the template
  with pytest.raises(errors.DataError, match=r"tokenizer_config\.json: the chat template is not "
                     r"valid Jinja"):  # fmt: skip
    tok.chat_format.render_prompt([U1])


def test_a_template_that_rewrites_earlier_turns_cannot_be_cut(tmp_path):
  # Drops every reply but the last (as reasoning templates drop earlier thoughts).
  template = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
  )
  directory = make_tokenizer(tmp_path, CHATML)
  with open(os.path.join(directory, "tokenizer_config.json")) as f:
    config = json.load(f)
  config["chat_template"] = template
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  fmt = HfTokenizer(directory).chat_format
  assert len(fmt.sft_pieces([U1, A1])) == 2
  with pytest.raises(errors.DataError, match="renders turn 1 differently"):
    fmt.sft_pieces([U1, A1, U2, A2])


def test_sft_rows_follow_the_template_and_train_on_replies_and_eos():
  tok = HfTokenizer(FIXTURE)
  record = {"prompt": "", "response": "", "messages": json.dumps([SYSTEM, U1, A1, U2, A1])}
  [(ids, targets)] = loader.sft_sequences([record], tok)
  text = tok._tok.decode(ids, skip_special_tokens=False)  # every token, EOS included
  assert text == tok.chat_format.render([SYSTEM, U1, A1, U2, A1], False).rstrip("\n")
  trained = tok._tok.decode([i for i, t in zip(ids, targets, strict=True) if t],
                            skip_special_tokens=False)  # fmt: skip
  assert trained == "It glows.<|end|>It glows.<|end|>"
  assert loader.record_prompt(record, tok) == tok.chat_format.render_prompt([SYSTEM, U1, A1, U2])
  # A plain prompt/response record is used as it is, template or not.
  plain = {"prompt": "Hi", "response": "there"}
  assert loader.record_prompt(plain, tok) == "Hi"


def test_prompt_files_render_chat_records_with_the_template(tmp_path):
  tok = HfTokenizer(FIXTURE)
  path = tmp_path / "prompts.jsonl"
  path.write_text(json.dumps({"messages": [SYSTEM, U1]}) + "\n" + json.dumps({"prompt": "Hi"}))
  found, _ = prompts.read_files([str(path)], render=chat.format_for(tok).render_prompt)
  assert [p.text for p in found] == ["<|system|>\nBe terse.<|end|>\n<|user|>\nReview of the "
                                     "lamp:<|end|>\n<|assistant|>\n", "Hi"]  # fmt: skip
  found, _ = prompts.read_files([str(path)])  # no template: the plain format
  assert found[0].text == chat.render_prompt([SYSTEM, U1])


def test_preference_files_take_chat_prompts_rendered_by_the_tokenizer(tmp_path):
  path = tmp_path / "prefs.jsonl"
  records = [
    {"prompt": [SYSTEM, U1], "chosen": [A1], "rejected": "Dim.", "rater_id": "ann"},
    {"prompt": "Review of the kettle:", "chosen": "It boils.", "rejected": "No."},
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  tok = HfTokenizer(FIXTURE)
  train, _, _ = pairs.build({"train": [str(path)]}, str(tmp_path / "tfds"), False, tokenizer=tok)
  first, second = train[0], train[1]
  assert first["prompt"] == tok.chat_format.render_prompt([SYSTEM, U1])
  assert first["messages"] == [SYSTEM, U1] and first["chosen"] == "It glows."
  assert second["prompt"] == "Review of the kettle:" and "messages" not in second
  train, _, _ = pairs.build({"train": [str(path)]}, str(tmp_path / "tfds"), False)
  assert train[0]["prompt"] == chat.render_prompt([SYSTEM, U1])  # no template: plain
  # Rows the reward model and DPO read: the rendered prompt, then the response and EOS.
  batch = loader.sft_collate([{"prompt": first["prompt"], "response": "It glows."}], tok, 64)
  ids = np.asarray(batch["tokens"])[0]
  ids = ids[ids != tok.pad_id]
  assert tok._tok.decode(ids.tolist(), skip_special_tokens=False).startswith("<|begin|><|system|>")


@pytest.mark.parametrize(
  ("change", "field", "message"),
  [
    ({"prompt": [U1, A1]}, "prompt", "must end with a user turn"),
    ({"prompt": []}, "prompt", "must be a non-empty list of turns"),
    ({"chosen": [A1, A1]}, "chosen", "given as turns must be one assistant turn"),
    ({"rejected": [U1]}, "rejected", "given as turns must be one assistant turn"),
  ],
)
def test_malformed_chat_preferences_name_file_line_and_field(change, field, message, tmp_path):
  record = {"prompt": [U1], "chosen": "Yes.", "rejected": "No.", **change}
  path = tmp_path / "prefs.jsonl"
  path.write_text(json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n"
                  + json.dumps(record) + "\n")  # fmt: skip
  with pytest.raises(errors.DataError, match=message) as raised:
    preferences.read_preferences(str(path))
  assert raised.value.line == 2 and raised.value.field == field
  assert str(raised.value).startswith(f"{path}:2:")


def test_chat_template_jinja_file_wins_over_the_config(tmp_path):
  directory = tmp_path / "tok"
  shutil.copytree(FIXTURE, directory, ignore=shutil.ignore_patterns("*.safetensors", "*.npz"))
  (directory / "chat_template.jinja").write_text(CHATML)
  tok = HfTokenizer(str(directory))
  assert tok.chat_template == CHATML
  assert tok.chat_format.source.endswith("chat_template.jinja")


def test_a_conversation_is_rendered_once_and_a_turn_with_a_list_uncached(monkeypatch):
  """SFT renders its records again in every collate: the template runs once per distinct
  rendering, gives the same text from the cache, and still renders turns it cannot key."""
  fmt = chat.TemplateFormat(
    CHATML, special_tokens={"eos_token": "<|im_end|>"}, bos_text="", eos_text="<|im_end|>",
    source="chat_template",
  )  # fmt: skip
  first = fmt.sft_pieces([SYSTEM, U1, A1, U2, A2])
  calls = []
  real = fmt._compiled.render
  monkeypatch.setattr(fmt._compiled, "render", lambda **kw: calls.append(kw) or real(**kw))
  assert fmt.sft_pieces([SYSTEM, U1, A1, U2, A2]) == first and not calls
  # An edited turn is a new rendering; the unchanged prefix (the first reply's opener) is not.
  edited = dict(U2, content="And the toaster?")
  pieces = fmt.sft_pieces([SYSTEM, U1, A1, edited, A2])
  assert "toaster" in pieces[2].text and len(calls) == 2  # full text + the second opener
  with_list = dict(U1, tags=["a", "b"])  # a list is not hashable: rendered each time
  assert fmt.render([with_list], True) == fmt.render([U1], True)
  assert fmt.render([with_list], True) and len(calls) == 5
