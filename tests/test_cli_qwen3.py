"""CLI acceptance for Qwen3: ``make-checkpoint --preset qwen3-mini``, ``generate`` and
``logits`` (reference and fused backends) on it, ``logits`` vs transformers' cached decode,
``quantize`` + W8A8 generate, and ``bench`` routing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

# fp32: the reference is bit-exact with transformers' eager prefill; cached decode differs
# by GEMM shapes only. Logits of scale ~5: bound 1e-4 (~170 fp32 ulps at 5.0).
FP32_ATOL = 1e-4


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_kernels", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def q3_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "qwen3-mini"
    r = _run("make-checkpoint", "--preset", "qwen3-mini", "--seed", "3", "--dtype", "float32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def _hf_cached(ckpt, prompt, decode):
    transformers.logging.set_verbosity_error()
    m = transformers.Qwen3ForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ids = torch.tensor([prompt + decode])
    with torch.no_grad():
        o = m(ids[:, :len(prompt)], use_cache=True)
        pre, pkv, dec = o.logits[0], o.cache, []
        for i in range(len(decode)):
            o = m(ids[:, len(prompt) + i:len(prompt) + i + 1], cache=pkv, use_cache=True)
            dec.append(o.logits[0])
            pkv = o.cache
    return pre, torch.cat(dec)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_logits_batch_matches_transformers(q3_ckpt, tmp_path, backend):
    prompts = [list(range(3, 40)), [7, 300, 2]]
    decodes = [[5, 17, 300, 2], [9, 8, 7, 6, 5, 4]]
    out = tmp_path / "l.safetensors"
    args = ["logits", "--checkpoint", str(q3_ckpt), "--backend", backend, "--out", str(out)]
    for p, d in zip(prompts, decodes):
        args += ["--input-ids", ",".join(map(str, p)), "--decode-ids", ",".join(map(str, d))]
    r = _run(*args)
    assert r.returncode == 0, r.stderr
    got = load_file(str(out))
    for b, (p, d) in enumerate(zip(prompts, decodes)):
        pre, dec = _hf_cached(q3_ckpt, p, d)
        assert got[f"prefill_logits.{b}"].shape == (len(p), 512)
        assert (got[f"prefill_logits.{b}"] - pre).abs().max().item() <= FP32_ATOL
        assert (got[f"decode_logits.{b}"] - dec).abs().max().item() <= FP32_ATOL


def test_generate_and_quantize(q3_ckpt, tmp_path):
    r = _run("generate", "--checkpoint", str(q3_ckpt), "--max-new-tokens", "6", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "model: Qwen3 D=128" in r.stdout and "generated ids:" in r.stdout
    ref_ids = r.stdout.split("generated ids:")[1].split()[0]
    r = _run("generate", "--checkpoint", str(q3_ckpt), "--max-new-tokens", "6", "--dtype", "float32",
             "--backend", "fused")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("generated ids:")[1].split()[0] == ref_ids  # greedy, fp32: same tokens
    w8 = tmp_path / "w8"
    r = _run("quantize", "--checkpoint", str(q3_ckpt), "--out", str(w8))
    assert r.returncode == 0, r.stderr
    r = _run("generate", "--checkpoint", str(w8), "--max-new-tokens", "4", "--backend", "fused")
    assert r.returncode == 0, r.stderr
    assert "generated ids:" in r.stdout and len(r.stdout.split("generated ids:")[1].split()[0].split(",")) == 4


def test_errors_are_clear(q3_ckpt):
    r = _run("generate", "--checkpoint", str(q3_ckpt), "--prompt-ids", "1,512")
    assert r.returncode != 0 and "[0, 512)" in r.stderr
    r = _run("generate", "--checkpoint", str(q3_ckpt), "--max-new-tokens", "5000")
    assert r.returncode == 2 and "max_position_embeddings" in r.stderr
    r = _run("make-checkpoint", "--preset", "qwen3-mini", "--experts", "4", "--out", "/tmp/never")
    assert r.returncode == 2 and "dense model" in r.stderr


def test_bench_routes_qwen3_presets():
    """``bench`` picks the model through the registry: a preset's spec and its bench adapter."""
    from llm_kernels.bench.driver import adapter_for, select_model

    def name(argv):
        return adapter_for(select_model(argv, "flash")[0]).name

    assert name(["--preset", "qwen3-32b", "--batch", "1"]) == "bench_qwen3_layer"
    assert name(["--preset=qwen3-mini"]) == "bench_qwen3_layer"
    assert name(["--preset", "flash"]) == "bench_layer"
    assert name([]) == "bench_layer"


def test_profile_traces_qwen3_with_its_roofline(q3_ckpt, tmp_path):
    import json

    out = tmp_path / "trace.json"
    r = _run("profile", "--checkpoint", str(q3_ckpt), "--steps", "2", "--bandwidth", "40", "--out", str(out))
    assert r.returncode == 0, r.stderr
    events = json.loads(out.read_text())["traceEvents"]
    attn = [e["args"] for e in events if e.get("name") == "attention" and e.get("ph") == "X"]
    decode = [a for a in attn if a["rows_per_seq"] == 1]
    prefill = [a for a in attn if a["rows_per_seq"] > 1]
    assert len(decode) == 2 * len(prefill) > 0  # 2 decode steps, one slice per layer each
    # decode slices carry the Qwen3 decode byte model (weights 0 for attention: the K/V read)
    from llm_kernels import models
    from llm_kernels.models.qwen3.roofline import stage_bytes

    cfg = models.load_config(q3_ckpt)
    assert [a["bytes"] for a in decode] == [stage_bytes(cfg, "attention", 1, a["L"], "bf16") for a in decode]
    assert all("% roofline" in a for a in decode)
    assert all("bytes" not in a for a in prefill)  # prefill is not modelled
