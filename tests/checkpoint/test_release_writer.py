"""Writing the official release format (``make-checkpoint --format release``, ``quantize
--format release``) and quantising a release checkpoint to this project's INT8 formats from
its dequantised weights (``quantize --scheme``), for both models."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from llm_kernels import models
from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint
from llm_kernels.checkpoint.quantized import quantize_weights
from llm_kernels.checkpoint.release import release_quantization_config
from llm_kernels.checkpoint.writer import quantize_checkpoint
from llm_kernels.errors import CheckpointError
from llm_kernels.models import preset
from llm_kernels.numerics.group_quant import GroupQuantWeight
from llm_kernels.numerics.mxfp4 import MXFP4Weight
from llm_kernels.numerics.quant import QuantWeight

F32 = torch.float32


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module", params=["mini", "qwen3-mini"])
def ckpts(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"relw_{request.param}")
    cfg = preset(request.param)
    flt = write_random_checkpoint(cfg, d / "float", seed=3, progress=False)
    rel = write_random_checkpoint(cfg, d / "release", seed=3, progress=False, format="release")
    return cfg, flt, rel


def test_make_checkpoint_release_equals_quantize_release(ckpts, tmp_path):
    cfg, flt, rel = ckpts
    q = quantize_checkpoint(flt, tmp_path / "q", progress=False, format="release")
    assert _digest(q) == _digest(rel)
    conf = json.loads((rel / "config.json").read_text())
    assert conf["quantization_config"] == release_quantization_config(cfg)
    raw = load_checkpoint(rel, progress=False)[1]
    kinds = {type(t).__name__ for t in raw.values()}
    assert ("MXFP4Weight" in kinds) == (models.spec_for_config(cfg).model_type == "deepseek_v4") and "GroupQuantWeight" in kinds


def test_release_reads_back_as_the_encoded_weights(ckpts):
    """Dequantised release weights are close to the float ones they were encoded from, and
    exactly the float tensors where the release keeps floats."""
    cfg, flt, rel = ckpts
    _, f = load_checkpoint(flt, dtype=F32, progress=False)
    _, r = load_checkpoint(rel, dtype=F32, quant="none", progress=False)
    assert list(f) == list(r)
    changed = 0
    for k in f:
        if torch.equal(f[k], r[k]):
            continue
        changed += 1
        rel_err = (f[k] - r[k]).norm() / f[k].norm()
        assert rel_err < 0.2, (k, rel_err)            # FP8 ~3 %, MXFP4 ~10 % on Gaussian weights
    assert changed > 0


@pytest.mark.parametrize("scheme", ["w8a8", "int8_g32"])
def test_release_to_int8_uses_the_dequantized_weights(ckpts, tmp_path, scheme):
    cfg, _, rel = ckpts
    out = quantize_checkpoint(rel, tmp_path / scheme, progress=False, scheme=scheme, shard_size_bytes=400_000)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == \
        f"llm_kernels_{scheme}"
    _, deq = load_checkpoint(rel, dtype=F32, quant="none", progress=False)
    want = quantize_weights(deq, cfg, scheme=scheme)
    _, bf = load_checkpoint(rel, quant="none", progress=False)           # the release's float dtype
    _, got = load_checkpoint(out, progress=False)
    assert list(got) == list(want)
    kind = GroupQuantWeight if scheme == "int8_g32" else QuantWeight
    n = 0
    for k, w in want.items():
        if isinstance(w, kind):
            n += 1
            assert isinstance(got[k], kind) and torch.equal(got[k].qweight, w.qweight), k
            assert torch.equal(got[k].scale, w.scale), k
        else:
            assert not isinstance(got[k], MXFP4Weight) and torch.equal(got[k], bf[k]), k
    assert n > 0


def test_release_refusals(ckpts, tmp_path):
    _, flt, rel = ckpts
    with pytest.raises(CheckpointError, match="already a release"):
        quantize_checkpoint(rel, tmp_path / "x", progress=False, format="release")
    with pytest.raises(ValueError, match="scheme 'int8' applies to format 'int8'"):
        quantize_checkpoint(flt, tmp_path / "x", progress=False, format="release", scheme="int8")
    with pytest.raises(ValueError, match="format must be one of"):
        write_random_checkpoint(preset("mini"), tmp_path / "x", progress=False, format="fp8")
    assert not (tmp_path / "x").exists()
