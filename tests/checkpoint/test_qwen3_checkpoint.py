"""Qwen3 checkpoints: written files load in transformers and in ours; validation errors
name the tensor; W8A8 conversion; tied embeddings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_kernels.errors import CheckpointError
from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint
from llm_kernels.checkpoint.writer import quantize_checkpoint
from llm_kernels.models import preset
from llm_kernels.numerics.quant import QuantWeight


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("q3")
    cfg = preset("qwen3-mini", num_hidden_layers=2)
    write_random_checkpoint(cfg, d, seed=5, dtype=torch.bfloat16, progress=False)
    return cfg, d


def _rewrite(src, dst, mutate):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    t = load_file(str(src / "model.safetensors"))
    mutate(t)
    save_file(t, str(dst / "model.safetensors"))
    return dst


def test_loads_with_transformers_names_and_dtypes(ckpt):
    cfg, d = ckpt
    c, w = load_checkpoint(d, dtype=torch.float32, progress=False)
    assert c == cfg
    assert "model.layers.1.self_attn.k_norm.weight" in w and "lm_head.weight" in w
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (cfg.q_size, cfg.hidden_size)
    _, wb = load_checkpoint(d, dtype=torch.bfloat16, progress=False)
    # Qwen3 norms follow the model dtype (transformers keeps no fp32 norm weights here)
    assert wb["model.norm.weight"].dtype == torch.bfloat16


def test_transformers_reads_our_checkpoint(ckpt):
    import transformers

    cfg, d = ckpt
    m = transformers.Qwen3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    _, w = load_checkpoint(d, dtype=torch.float32, progress=False)
    sd = m.state_dict()
    for k, v in w.items():
        assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("mutate, match", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing 1 .*model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(32)}),
     r"q_norm.weight.*expected shape \[64\], got \[32\]"),
    (lambda t: t.update({"model.layers.0.self_attn.rotary.inv_freq": torch.ones(4)}), "unexpected"),
    (lambda t: t["model.layers.0.mlp.down_proj.weight"].view(-1).__setitem__(7, float("nan")),
     "down_proj.weight.*1 NaN"),
])
def test_bad_tensors_are_named(ckpt, tmp_path, mutate, match):
    _, d = ckpt
    bad = _rewrite(d, tmp_path / "bad", mutate)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(bad, progress=False)


def test_tied_embeddings(tmp_path):
    import transformers

    cfg = preset("qwen3-mini", num_hidden_layers=1).replace(tie_word_embeddings=True)
    write_random_checkpoint(cfg, tmp_path, seed=1, dtype=torch.float32, progress=False)
    c, w = load_checkpoint(tmp_path, dtype=torch.float32, progress=False)
    assert c.tie_word_embeddings and "lm_head.weight" not in w
    m = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(m.lm_head.weight, w["model.embed_tokens.weight"])
    # an lm_head in a tied checkpoint is not silently used or dropped
    bad = _rewrite(tmp_path, tmp_path / "bad", lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    with pytest.raises(CheckpointError, match="unexpected.*lm_head.weight"):
        load_checkpoint(bad, progress=False)


def test_w8a8_conversion(ckpt, tmp_path):
    cfg, d = ckpt
    out = quantize_checkpoint(d, tmp_path / "w8", progress=False)
    conf = json.loads((out / "config.json").read_text())
    assert conf["quantization_config"]["quant_method"] == "llm_kernels_w8a8"
    _, wq = load_checkpoint(out, progress=False)
    _, wl = load_checkpoint(d, dtype=torch.bfloat16, progress=False, quant="w8a8")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert isinstance(wq[name], QuantWeight) and isinstance(wl[name], QuantWeight)
        assert torch.equal(wq[name].qweight, wl[name].qweight)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.self_attn.q_norm.weight"):
        assert not isinstance(wq[name], QuantWeight), name
    assert sum(isinstance(v, QuantWeight) for v in wq.values()) == 7 * cfg.num_hidden_layers
