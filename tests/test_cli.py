"""CLI acceptance: ``make-checkpoint --preset mini`` then ``logits`` on that directory must
match ``transformers`` loading the same directory, for prefill and each decode step."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

# fp32 tolerance: the reference is bit-exact with transformers for whole-prompt prefill;
# cached decode differs only by GEMM shapes/accumulation order. Observed max-abs on
# logits of scale ~5: prefill 0, decode <= 1e-5. Bound: 1e-4 (~170 fp32 ulps at 5.0).
FP32_ATOL = 1e-4


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_kernels", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def mini_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "mini"
    r = _run("make-checkpoint", "--preset", "mini", "--seed", "7", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def _hf_logits(ckpt, prompt, decode, dtype):
    transformers.logging.set_verbosity_error()
    m = transformers.DeepseekV4ForCausalLM.from_pretrained(str(ckpt), dtype=dtype).eval()
    ids = torch.tensor([prompt + decode])
    with torch.no_grad():
        out = m(ids[:, : len(prompt)], use_cache=True)
        pre, pkv, dec = out.logits[0].float(), out.cache, []
        for i in range(len(decode)):
            o = m(ids[:, len(prompt) + i: len(prompt) + i + 1], cache=pkv, use_cache=True)
            dec.append(o.logits[0].float())
            pkv = o.cache
    return pre, torch.cat(dec) if dec else torch.zeros(0, pre.shape[-1])


def test_logits_matches_transformers_fp32(mini_ckpt, tmp_path):
    prompt = list(range(3, 40))
    decode = [5, 17, 300, 2, 99, 7]
    out = tmp_path / "l.safetensors"
    r = _run("logits", "--checkpoint", str(mini_ckpt), "--input-ids", ",".join(map(str, prompt)),
             "--decode-ids", ",".join(map(str, decode)), "--out", str(out))
    assert r.returncode == 0, r.stderr
    got = load_file(str(out))
    assert set(got) == {"prefill_logits", "decode_logits"}
    assert got["prefill_logits"].dtype == torch.float32
    pre, dec = _hf_logits(mini_ckpt, prompt, decode, torch.float32)
    assert got["prefill_logits"].shape == pre.shape == (len(prompt), 512)
    assert got["decode_logits"].shape == dec.shape == (len(decode), 512)
    assert (got["prefill_logits"] - pre).abs().max().item() <= FP32_ATOL
    for i in range(len(decode)):  # every decode step
        assert (got["decode_logits"][i] - dec[i]).abs().max().item() <= FP32_ATOL, f"decode step {i}"


def test_logits_batch_names_and_values(mini_ckpt, tmp_path):
    out = tmp_path / "b.safetensors"
    r = _run("logits", "--checkpoint", str(mini_ckpt), "--input-ids", "1,2,3,4,5", "--decode-ids", "6,7",
             "--input-ids", "9,8,7", "--decode-ids", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    got = load_file(str(out))
    assert set(got) == {"prefill_logits.0", "decode_logits.0", "prefill_logits.1", "decode_logits.1"}
    assert got["decode_logits.0"].shape[0] == 2 and got["decode_logits.1"].shape[0] == 1
    pre, dec = _hf_logits(mini_ckpt, [9, 8, 7], [1], torch.float32)
    assert (got["prefill_logits.1"] - pre).abs().max().item() <= FP32_ATOL
    assert (got["decode_logits.1"] - dec).abs().max().item() <= FP32_ATOL


def test_logits_bf16_cosine(mini_ckpt, tmp_path):
    prompt, decode = list(range(10, 50)), [1, 2, 3]
    out = tmp_path / "bf.safetensors"
    r = _run("logits", "--checkpoint", str(mini_ckpt), "--input-ids", ",".join(map(str, prompt)),
             "--decode-ids", ",".join(map(str, decode)), "--dtype", "bfloat16", "--out", str(out))
    assert r.returncode == 0, r.stderr
    got = load_file(str(out))
    pre, dec = _hf_logits(mini_ckpt, prompt, decode, torch.bfloat16)
    a = torch.cat([got["prefill_logits"], got["decode_logits"]]).double().flatten()
    b = torch.cat([pre, dec]).double().flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() >= 0.9999


def test_cli_errors(mini_ckpt, tmp_path):
    r = _run("logits", "--checkpoint", str(mini_ckpt), "--input-ids", "1,2,99999", "--out",
             str(tmp_path / "x.safetensors"))
    assert r.returncode != 0 and "--input-ids" in r.stderr
    r = _run("logits", "--checkpoint", str(tmp_path / "nope"), "--input-ids", "1", "--out",
             str(tmp_path / "x.safetensors"))
    assert r.returncode != 0 and "nope" in r.stderr
    r = _run("logits", "--checkpoint", str(mini_ckpt), "--input-ids", "1,2", "--decode-ids", "3",
             "--input-ids", "4", "--out", str(tmp_path / "x.safetensors"))
    assert r.returncode != 0 and "--decode-ids" in r.stderr


def test_generate_prints_ids_and_timings(mini_ckpt):
    r = _run("generate", "--checkpoint", str(mini_ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "4",
             "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "generated ids:" in r.stdout and "tok/s" in r.stdout and "sparse_attn" in r.stdout
    gen = [int(t) for t in r.stdout.split("generated ids:")[1].splitlines()[0].strip().split(",")]
    assert len(gen) == 4
    # greedy ids equal transformers' greedy continuation
    transformers.logging.set_verbosity_error()
    m = transformers.DeepseekV4ForCausalLM.from_pretrained(str(mini_ckpt), dtype=torch.float32).eval()
    ids = [1, 2, 3]
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(m(torch.tensor([ids])).logits[0, -1].argmax()))
    assert gen == ids[3:]


def test_cli_prunes_stale_kernel_caches(tmp_path, monkeypatch, capsys):
    """Every CLI run deletes the Numba caches of other kernel-source versions (issue 13, CLI
    hygiene) and says so; this version's cache stays."""
    from llm_kernels import cli
    from llm_kernels.kernels.common import jit

    monkeypatch.setattr(jit, "_USER_CACHE_DIR", None)
    monkeypatch.setenv("LLM_KERNELS_CACHE", str(tmp_path))
    root = tmp_path / "numba"
    (root / "0123456789abcdef" / "avx2").mkdir(parents=True)
    (root / jit.SOURCE_HASH).mkdir()
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--help"])
    assert not (root / "0123456789abcdef").exists() and (root / jit.SOURCE_HASH).is_dir()
    assert "removed 1 stale kernel cache" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--help"])
    assert "stale" not in capsys.readouterr().err
