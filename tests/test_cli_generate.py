"""``generate``: fused backend by default, ``--threads`` sets torch AND the kernels' threads,
kernel compilation happens in an announced warm-up outside the tok/s figures, and the
prefill computes logits for the last prompt row only."""

from __future__ import annotations

import numba
import pytest
import torch

from llm_kernels import cli, models
from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint
from llm_kernels.kernels.common import jit


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini")
    write_random_checkpoint(models.preset("mini", num_hidden_layers=2), out, seed=5, dtype=torch.float32,
                            progress=False)
    return out


def _ids(out: str, what: str = "generated ids:") -> list[int]:
    return [int(t) for t in out.split(what)[1].splitlines()[0].strip().split(",")]


def test_fused_is_the_default_and_matches_the_reference(mini, capsys):
    assert cli.main(["generate", "--checkpoint", str(mini), "--max-new-tokens", "6", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "backend: fused" in out and "warm-up (kernel compile/load" in out
    fused, prompt = _ids(out), _ids(out, "prompt ids:")
    assert cli.main(["generate", "--checkpoint", str(mini), "--max-new-tokens", "6", "--dtype", "float32",
                     "--backend", "reference"]) == 0
    assert _ids(capsys.readouterr().out) == fused

    # the greedy ids equal the argmax of a full-logits run (prefill reads the last row only)
    # until the first EOS (generation_config.json's eos ids end the run)
    cfg, w = load_checkpoint(mini, dtype=torch.float32, progress=False)
    eng = models.spec_for_config(cfg).make_engine(w, cfg, dtype=torch.float32, max_seq_len=64)
    (sid,), (lg,) = eng.prefill([prompt])
    seq = [int(lg[-1].argmax())]
    for _ in range(5):
        seq.append(int(eng.decode([sid], [seq[-1]])[0][-1].argmax()))
    eos = {0, 2}  # <|endoftext|>, <|im_end|> of the random tokenizer
    n = next((i + 1 for i, t in enumerate(seq) if t in eos), len(seq))
    assert seq[:n] == fused


def test_threads_sets_torch_and_numba(mini, capsys):
    before = (torch.get_num_threads(), numba.get_num_threads())
    try:
        assert cli.main(["generate", "--checkpoint", str(mini), "--max-new-tokens", "2", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
        assert "threads: 1" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])
    with pytest.raises(SystemExit, match="--threads must be in"):
        cli.main(["generate", "--checkpoint", str(mini), "--threads", "10000"])


def test_cold_kernel_cache_is_announced(mini, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(jit, "kernel_cache_dir", lambda: str(tmp_path / "empty-cache"))
    assert cli.main(["generate", "--checkpoint", str(mini), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "compiling the kernels (once; cached in" in err and "compiled the kernels in" in err
    # a warm cache (any .nbi index) says nothing
    monkeypatch.setattr(jit, "kernel_cache_dir", lambda: str(tmp_path))
    (tmp_path / "x.nbi").write_text("")
    assert cli.main(["generate", "--checkpoint", str(mini), "--max-new-tokens", "2"]) == 0
    assert "compiling" not in capsys.readouterr().err


def test_speculative_mtp_flag(tmp_path, capsys):
    """``--speculative mtp``: the same greedy ids as plain decoding, the acceptance line; a
    checkpoint without the block and ``--draft-tokens 2`` are clear errors."""
    ck = write_random_checkpoint(models.preset("mini", num_hidden_layers=2, mtp_layers=1), tmp_path / "m", seed=5,
                                 dtype=torch.float32, progress=False)
    base = ["generate", "--checkpoint", str(ck), "--max-new-tokens", "8", "--temperature", "0", "--quant", "int8"]
    assert cli.main(base) == 0
    plain = _ids(capsys.readouterr().out)
    assert cli.main(base + ["--speculative", "mtp"]) == 0
    out = capsys.readouterr().out
    assert _ids(out) == plain and "speculative (mtp): 7 verify steps" in out and "drafts accepted" in out
    assert cli.main(base + ["--speculative", "mtp", "--draft-tokens", "2"]) != 0
    assert "draft_tokens must be 1" in capsys.readouterr().err
    no_mtp = write_random_checkpoint(models.preset("mini", num_hidden_layers=2), tmp_path / "n", seed=5,
                                     dtype=torch.float32, progress=False)
    assert cli.main(["generate", "--checkpoint", str(no_mtp), "--speculative", "mtp", "--max-new-tokens", "2"]) != 0
    assert "num_nextn_predict_layers is 0" in capsys.readouterr().err
