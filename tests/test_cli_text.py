"""``generate`` with text: ``--prompt`` prints the prompt and the streamed text (equal to the
decoded greedy ids), ``--quiet`` prints the text only, sampling flags and stop strings reach
the sampler, ``--chat`` reads turns from stdin, and bad flags get a clear error naming them."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from llm_kernels import cli, models
from llm_kernels.checkpoint import write_random_checkpoint
from llm_kernels.text.tokenizer import Tokenizer

BASE = ["--backend", "reference", "--dtype", "float32"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini-text")
    write_random_checkpoint(models.preset("mini", num_hidden_layers=2), out, seed=5, dtype=torch.float32,
                            progress=False)
    return out


def _ids(out: str, what: str) -> list[int]:
    line = out.split(what)[1].splitlines()[0].strip()
    return [int(t) for t in line.split(",")] if line else []


def test_prompt_prints_the_streamed_text(mini, capsys):
    tok = Tokenizer.from_dir(mini)
    assert cli.main(["generate", "--checkpoint", str(mini), "--prompt", "Hello 你好", "--max-new-tokens", "6",
                     "--ignore-eos", *BASE]) == 0
    out = capsys.readouterr().out
    prompt, gen = _ids(out, "prompt ids:"), _ids(out, "generated ids:")
    assert prompt == tok.encode("Hello 你好") and len(gen) == 6
    body = out.split("not in the figures below): ")[1].split("\n", 1)[1].split("\nprompt ids:")[0]
    assert body == "Hello 你好" + tok.decode(gen)
    assert "finish reason: length" in out and "tok/s" in out

    assert cli.main(["generate", "--checkpoint", str(mini), "--prompt", "Hello 你好", "--max-new-tokens", "6",
                     "--ignore-eos", "--quiet", *BASE]) == 0
    assert capsys.readouterr().out == tok.decode(gen) + "\n"


def test_sampling_flags_seed_and_stop(mini, capsys):
    args = ["generate", "--checkpoint", str(mini), "--prompt", "Once", "--max-new-tokens", "8", "--ignore-eos",
            "--temperature", "1.0", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.01", "--repetition-penalty",
            "1.1", "--presence-penalty", "0.2", "--frequency-penalty", "0.1", "--seed", "3", "--quiet", *BASE]
    assert cli.main(args) == 0
    a = capsys.readouterr().out
    assert cli.main(args) == 0
    assert capsys.readouterr().out == a  # seeded: reproducible
    assert cli.main([*args[:-5], "--seed", "4", "--quiet", *BASE]) == 0
    assert capsys.readouterr().out != a
    text = a[:-1]
    stop = next(text[i:i + 2] for i in range(1, len(text) - 1) if "\ufffd" not in text[i:i + 2]
                and text.find(text[i:i + 2]) == i)
    assert cli.main([*args, "--stop", stop]) == 0
    assert capsys.readouterr().out == text[:text.find(stop)] + "\n"


def test_chat_reads_turns_from_stdin(mini, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\nhow are you?\n/reset\nagain\n/exit\nnever read\n"))
    assert cli.main(["generate", "--checkpoint", str(mini), "--chat", "--max-new-tokens", "3", "--ignore-eos",
                     *BASE]) == 0
    err = capsys.readouterr().err
    assert err.count("[3 tokens, finish: length") == 3 and "(conversation reset)" in err
    assert "reused 0 cached" in err  # the first turn


@pytest.mark.parametrize("flags,match", [
    (["--max-new-tokens", "-1"], "--max-new-tokens: must be >= 0, got -1"),
    (["--max-new-tokens", "x"], "--max-new-tokens: expected an integer >= 0"),
    (["--prompt", "a", "--prompt-ids", "1,2"], "not allowed with argument"),
])
def test_bad_flags_exit_2_naming_the_flag(mini, capsys, flags, match):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--checkpoint", str(mini), *flags])
    assert e.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.parametrize("flags,match", [
    (["--top-p", "2"], r"--top-p must be a number in (0, 1], got 2.0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--prompt", ""], "the prompt is empty"),
])
def test_bad_values_are_clear_errors(mini, capsys, flags, match):
    try:
        code = cli.main(["generate", "--checkpoint", str(mini), *flags, *BASE])
        msg = capsys.readouterr().err
    except SystemExit as e:
        code, msg = 2, str(e.code)
    assert code == 2 and match in msg


def test_text_needs_a_tokenizer(tmp_path, capsys):
    write_random_checkpoint(models.preset("mini", num_hidden_layers=1), tmp_path, seed=1, dtype=torch.float32,
                            progress=False, tokenizer=False)
    with pytest.raises(SystemExit, match="tokenizer.json is missing"):
        cli.main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi", *BASE])
    # without a tokenizer the default prompt is ids, and ids still work
    assert cli.main(["generate", "--checkpoint", str(tmp_path), "--max-new-tokens", "2", "--ignore-eos", *BASE]) == 0
    out = capsys.readouterr().out
    assert _ids(out, "prompt ids:") == [1, 2, 3, 4, 5, 6, 7, 8] and len(_ids(out, "generated ids:")) == 2
