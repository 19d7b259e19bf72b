"""The ``int8`` quantisation scheme: every 2-D weight a Q8-class format quantises (the W8A8
set plus the head and, for DeepSeek-V4, wq_a / wkv / wo_a / compressors / weights_proj),
quantized on load or stored (``quantize --scheme int8``), for both models."""

from __future__ import annotations

import json

import pytest
import torch

from llm_kernels import models
from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint
from llm_kernels.checkpoint.names import expected_tensors
from llm_kernels.checkpoint.writer import quantize_checkpoint
from llm_kernels.errors import CheckpointError
from llm_kernels.models import preset
from llm_kernels.numerics.quant import QuantWeight

BF16 = torch.bfloat16


@pytest.fixture(scope="module", params=["mini", "qwen3-mini"])
def ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"int8_{request.param}")
    write_random_checkpoint(preset(request.param), d, seed=0, dtype=BF16, progress=False)
    return d


def _int8_names(w: dict) -> set[str]:
    return {n for n, t in w.items() if isinstance(t, QuantWeight)}


def test_int8_on_load_is_a_superset_of_w8a8_with_the_head(ckpt):
    cfg, w8 = load_checkpoint(ckpt, dtype=BF16, quant="w8a8", progress=False)
    spec = models.spec_for_config(cfg)
    _, i8 = load_checkpoint(ckpt, dtype=BF16, quant="int8", progress=False)
    head = "head.weight" if spec.model_type == "deepseek_v4" else "lm_head.weight"
    embed = "embed.weight" if spec.model_type == "deepseek_v4" else "model.embed_tokens.weight"
    assert _int8_names(w8) < _int8_names(i8)
    assert head in _int8_names(i8) and head not in _int8_names(w8)
    assert embed not in _int8_names(i8)
    assert _int8_names(i8) == {n for n in i8 if spec.quantized_weight("int8")(n)}
    for n in _int8_names(w8):  # the shared members are quantized identically
        assert torch.equal(w8[n].qweight, i8[n].qweight) and torch.equal(w8[n].scale, i8[n].scale)
    if spec.model_type == "deepseek_v4":
        assert {"layers.0.attn.wq_a.weight", "layers.0.attn.wkv.weight", "layers.0.attn.wo_a.weight"} <= _int8_names(i8)
        assert not any(".ffn.gate." in n for n in _int8_names(i8))     # the router stays float


def test_stored_int8_checkpoint_round_trip(ckpt, tmp_path):
    cfg, on_load = load_checkpoint(ckpt, dtype=BF16, quant="int8", progress=False)
    out = quantize_checkpoint(ckpt, tmp_path / "i8", progress=False, scheme="int8")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "llm_kernels_int8"
    assert set(qc["modules"]) >= set(models.spec_for_config(cfg).w8a8_modules)
    stored = expected_tensors(cfg, "int8")
    assert sum(1 for i in stored.values() if i.kind == "int8") == len(_int8_names(on_load))
    _, w = load_checkpoint(out, dtype=BF16, progress=False)             # as stored
    _, w2 = load_checkpoint(out, dtype=BF16, quant="int8", progress=False)
    for n in _int8_names(on_load):
        for got in (w[n], w2[n]):
            assert torch.equal(got.qweight, on_load[n].qweight) and torch.equal(got.scale, on_load[n].scale)
    with pytest.raises(CheckpointError, match="int8"):
        load_checkpoint(out, dtype=BF16, quant="w8a8", progress=False)
    with pytest.raises(CheckpointError, match="cannot be loaded as float"):
        load_checkpoint(out, dtype=BF16, quant="none", progress=False)


def test_w8a8_checkpoint_loaded_as_int8_quantizes_the_rest(ckpt, tmp_path):
    _, on_load = load_checkpoint(ckpt, dtype=BF16, quant="int8", progress=False)
    out = quantize_checkpoint(ckpt, tmp_path / "w8", progress=False)    # the w8a8 scheme
    _, w = load_checkpoint(out, dtype=BF16, quant="int8", progress=False)
    assert _int8_names(w) == _int8_names(on_load)
    for n in _int8_names(w):
        assert torch.equal(w[n].qweight, on_load[n].qweight)


def test_unknown_scheme_is_named():
    with pytest.raises(ValueError, match="'int4'"):
        models.get("deepseek_v4").quantized_weight("int4")
    with pytest.raises(ValueError, match="'int4'"):
        quantize_checkpoint("/nonexistent", "/tmp/x", scheme="int4")
