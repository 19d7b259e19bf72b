"""The tokenizer (``llm_kernels.text.tokenizer``) on the random checkpoints' byte-level BPE:
round trip, streaming detokenization of multi-byte text, special tokens / EOS ids, the
chat template against transformers' ``apply_chat_template`` on the same files, and the
files written deterministically."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from llm_kernels.checkpoint.random_tokenizer import MIN_VOCAB, write_random_tokenizer
from llm_kernels.errors import TokenizerError
from llm_kernels.text.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "你好，世界！今天天气很好。",
    "emoji 😀🚀✨👍🏽 family 👨‍👩‍👧 flags 🇯🇵",
    "mixed: café naïve — Ελληνικά 한국어 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \n\ttabs  and  spaces ",
    "code: def f(x):\n    return x ** 2  # ok",
    "",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_random_tokenizer(tmp_path_factory.mktemp("tok"), 512)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_same_ids_as_transformers(tok, hf, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert ids == hf.encode(text)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS[1:4])
def test_incremental_detokenization_never_splits_a_character(tok, text):
    ids = tok.encode(text)
    # multi-byte characters really are split over byte-level tokens in this vocabulary
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    inc = tok.incremental()
    pieces = [inc.add(i) for i in ids]
    pieces.append(inc.finish())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # every emitted prefix is a prefix of the text (nothing emitted twice or out of order)
    acc = ""
    for p in pieces:
        acc += p
        assert text.startswith(acc)


def test_incremental_flushes_a_cut_character_on_finish(tok):
    ids = tok.encode("ok 😀")
    inc = tok.incremental()
    out = "".join(inc.add(i) for i in ids[:-1])
    assert "😀" not in out and "\ufffd" not in out
    assert inc.finish() == tok.decode(ids[:-1])[len(out):]  # what a full decode gives, U+FFFD included
    assert inc.finish() == ""


def test_special_tokens_and_eos(tok, tok_dir):
    gen = json.loads((tok_dir / "generation_config.json").read_text())
    assert tok.eos_token == "<|im_end|>" and tok.bos_token is None
    assert tok.eos_token_ids == frozenset(gen["eos_token_id"]) | {tok.token_to_id("<|im_end|>")}
    ids = tok.encode("a<|im_end|>b")
    assert tok.token_to_id("<|im_end|>") in ids
    assert tok.decode(ids) == "ab" and tok.decode(ids, skip_special_tokens=False) == "a<|im_end|>b"
    # <think> is an added, non-special token: kept by decode
    assert tok.decode(tok.encode("<think>x</think>")) == "<think>x</think>"


def test_eos_from_config_json_without_generation_config(tmp_path):
    write_random_tokenizer(tmp_path, 400)
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    t = Tokenizer.from_dir(tmp_path)
    assert t.eos_token_ids == {7, 9, t.token_to_id("<|im_end|>")}
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(TokenizerError, match="config.json: eos_token_id"):
        Tokenizer.from_dir(tmp_path)


def test_add_bos_token_is_added_once(tmp_path):
    write_random_tokenizer(tmp_path, 400)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(bos_token={"content": "<|endoftext|>", "special": True}, add_bos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.from_dir(tmp_path)
    assert t.encode("hi")[0] == t.token_to_id("<|endoftext|>")
    assert t.encode("<|endoftext|>hi").count(t.token_to_id("<|endoftext|>")) == 1
    assert t.encode("hi", add_special_tokens=False)[0] != t.token_to_id("<|endoftext|>")


def test_missing_and_bad_files_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json: missing"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot be read"):
        Tokenizer.from_dir(tmp_path)
    write_random_tokenizer(tmp_path, 300)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: expected a JSON object"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="no chat_template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(TypeError, match="text must be a str"):
        Tokenizer.from_dir(tmp_path).encode(5)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好 😀"}],
    [{"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
     {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "because"}],
    [{"role": "user", "content": "call it"}, {"role": "assistant", "content": None},
     {"role": "tool", "content": "{\"ok\": true}"}],
]


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"enable_thinking": True},
                                    {"add_generation_prompt": False}])
def test_chat_template_equals_transformers(tok, hf, conv, kwargs):
    msgs = CONVERSATIONS[conv]
    kw = {"add_generation_prompt": True, **kwargs}
    ours = tok.apply_chat_template(msgs, **kw)
    theirs = hf.apply_chat_template(msgs, tokenize=False, **kw)
    assert ours == theirs
    assert tok.encode_chat(msgs, **kw) == list(hf.apply_chat_template(msgs, tokenize=True, return_dict=False, **kw))


def test_chat_template_thinking_switch_and_errors(tok):
    msgs = CONVERSATIONS[0]
    on, off = tok.apply_chat_template(msgs), tok.apply_chat_template(msgs, enable_thinking=False)
    assert on.endswith("<|im_start|>assistant\n") and off == on + "<think>\n\n</think>\n\n"
    with pytest.raises(TokenizerError, match="system message must come first"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(TypeError, match=r"messages\[0\] must be a dict"):
        tok.apply_chat_template(["hello"])


def test_files_are_deterministic_and_sized_to_the_vocab(tmp_path):
    a = write_random_tokenizer(tmp_path / "a", 700)
    b = write_random_tokenizer(tmp_path / "b", 700)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert Tokenizer.from_dir(a).vocab_size == 700
    assert write_random_tokenizer(tmp_path / "c", MIN_VOCAB - 1) is None
    assert not (tmp_path / "c").exists()
