"""Tokenizer: ids, chat prompts and streamed text match transformers on the built-in model's folder."""

import json
import random
import shutil

import pytest
from transformers import AutoTokenizer

from raymoe.errors import CheckpointError
from raymoe.model.builtin import builtin_model_path
from raymoe.model.detokenizer import IncrementalDetokenizer
from raymoe.model.tokenizer import ChatTemplateError, Tokenizer

TEXTS = [
    "Hello world! The lighthouse keeper wrote 3 lines.",
    "def add(a, b):\n    return a + b\n",
    "  leading spaces,\n\n\ttabs and trailing space ",
    "Emoji 🙂🚀 and CJK 你好，世界 and café naïve — “quotes”",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]
CHATS = {
    "plain": [{"role": "user", "content": "Hi there"}],
    "system_and_turns": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Thanks 🙂"},
    ],
    "content_parts": [
        {"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}]}
    ],
    "none_content": [{"role": "user", "content": "call it"}, {"role": "assistant", "content": None}],
}
# Exercises every helper transformers gives templates: tojson, raise_exception, strftime_now, loop controls,
# special-token variables, {% generation %}.
KITCHEN_SINK_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}"
    "{% if m['role'] not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "{% if loop.index > 3 %}{% break %}{% endif %}"
    "{% generation %}[{{ m['role'] }}] {{ m | tojson }}{% endgeneration %}\n"
    "{% endfor %}{{ strftime_now('%Y') }}{{ eos_token }}{% if add_generation_prompt %}>>{% endif %}"
)


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYMOE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return builtin_model_path()


@pytest.fixture(scope="module")
def tok(builtin_dir):
    return Tokenizer.from_dir(builtin_dir)


@pytest.fixture(scope="module")
def hf_tok(builtin_dir):
    return AutoTokenizer.from_pretrained(builtin_dir)


def _copy_with_config(src, dst, **changes):
    """A copy of the checkpoint folder `src` whose tokenizer_config.json has `changes` applied (None deletes)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("text", [t for t in TEXTS if "<|" not in t])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)


def test_special_tokens_and_sizes(builtin_dir, tok, hf_tok):
    vocab = json.loads((builtin_dir / "config.json").read_text())["vocab_size"]
    assert tok.vocab_size == len(hf_tok) == vocab
    assert tok.bos_token_id is None
    assert tok.eos_token_ids == (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>"))
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [tok.token_to_id("<|im_start|>")]


@pytest.mark.parametrize("name", list(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, name, add_generation_prompt):
    messages = CHATS[name]
    expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_template_helpers_match_transformers(builtin_dir, tmp_path):
    folder = _copy_with_config(
        builtin_dir,
        tmp_path / "m",
        chat_template=KITCHEN_SINK_TEMPLATE,
        bos_token={"__type": "AddedToken", "content": "<|im_start|>", "special": True},  # as transformers 4 saved it
    )
    messages = [{"role": "user", "content": f"ünïcode {i} <b>"} for i in range(5)]
    hf_tok = AutoTokenizer.from_pretrained(folder)
    expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert Tokenizer.from_dir(folder).apply_chat_template(messages) == expected


def test_raise_exception_in_template_is_a_chat_template_error(builtin_dir, tmp_path):
    tok = Tokenizer.from_dir(_copy_with_config(builtin_dir, tmp_path / "m", chat_template=KITCHEN_SINK_TEMPLATE))
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_named_templates_and_jinja_file(builtin_dir, tmp_path):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages | length }}"}]
    folder = _copy_with_config(builtin_dir, tmp_path / "m", chat_template=named)
    assert Tokenizer.from_dir(folder).apply_chat_template(CHATS["plain"]) == "D1"
    (folder / "chat_template.jinja").write_text("J")  # the separate file wins, as in transformers
    assert Tokenizer.from_dir(folder).apply_chat_template(CHATS["plain"]) == "J"


def test_no_chat_template_is_a_clear_error(builtin_dir, tmp_path):
    tok = Tokenizer.from_dir(_copy_with_config(builtin_dir, tmp_path / "m", chat_template=None))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template(CHATS["plain"])
    with pytest.raises(ChatTemplateError, match="empty"):
        Tokenizer.from_dir(builtin_dir).apply_chat_template([])


MULTI_BYTE_TEXT = "Emoji 🙂🚀🎉 then 你好，世界！ and 日本語のテキスト, 한국어 ✨"


@pytest.mark.parametrize("text", [MULTI_BYTE_TEXT, "plain ascii only"])
def test_incremental_detokenizer_streams_whole_characters(tok, text):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == detok.text == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    if any(ord(c) > 0x7FF for c in text):  # multi-byte characters span tokens: some pushes must wait
        assert "" in deltas


def test_incremental_detokenizer_after_a_prompt(tok):
    prompt, reply = tok.encode("Question: where?"), tok.encode(" Answer: 北京 🙂")
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    streamed = "".join(detok.push(i) for i in reply)
    assert streamed == tok.decode(prompt + reply)[len(tok.decode(prompt)) :]


def test_incomplete_character_is_held_back_until_flush(tok):
    ids = tok.encode("🙂")
    assert len(ids) > 1  # the emoji's 4 bytes are not one token in this small vocab
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[0]) == ""
    assert detok.flush() == "\ufffd"


def _python_only(tok, prompt_ids):
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids)
    detok._stream = None  # the scheme in Python throughout
    return detok


@pytest.mark.parametrize("seed", range(6))
def test_rust_stream_and_python_scheme_emit_the_same_deltas(tok, seed):
    """Random ids (many bytes that are no whole character, so pushes are held back), after random
    prompts: DecodeStream's deltas are the Python scheme's, push by push, and so is the flush."""
    rng = random.Random(seed)
    prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 12))]
    fast, slow = IncrementalDetokenizer(tok, prompt_ids=prompt), _python_only(tok, prompt)
    assert fast._stream is not None or not tok.decode(prompt[-5:]) or tok.decode(prompt[-5:]).endswith("\ufffd")
    for _ in range(80):
        token_id = rng.randrange(tok.vocab_size)
        assert fast.push(token_id) == slow.push(token_id)
    assert fast.flush() == slow.flush()
    assert fast.text == slow.text


def test_stream_not_started_on_an_incomplete_prompt_tail(tok):
    ids = tok.encode("🙂")
    detok = IncrementalDetokenizer(tok, prompt_ids=ids[:1])  # the prompt ends inside the emoji
    assert detok._stream is None
    assert detok.push(ids[1]) == _python_only(tok, ids[:1]).push(ids[1])


def test_missing_tokenizer_json(builtin_dir, tmp_path):
    folder = _copy_with_config(builtin_dir, tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json not found"):
        Tokenizer.from_dir(folder)


@pytest.mark.parametrize("filename", ["tokenizer.json", "tokenizer_config.json"])
def test_corrupt_tokenizer_files(builtin_dir, tmp_path, filename):
    folder = _copy_with_config(builtin_dir, tmp_path / "m")
    (folder / filename).write_text('{"model": {"type": "BPE", "vocab": [1, 2')
    with pytest.raises(CheckpointError, match=filename):
        Tokenizer.from_dir(folder)
