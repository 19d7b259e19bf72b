"""The ``int8_g32`` scheme: the ``int8`` weight set with one float16 scale per 32 inputs
(:mod:`llm_kernels.numerics.group_quant`), quantized on load or stored, for both models;
the fused engines on it against the reference engines."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from llm_kernels import models
from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint
from llm_kernels.checkpoint.names import expected_tensors
from llm_kernels.checkpoint.writer import quantize_checkpoint
from llm_kernels.errors import CheckpointError
from llm_kernels.kernels.common.prepared import PreparedGroupWeight
from llm_kernels.models import preset
from llm_kernels.numerics.group_quant import GroupQuantWeight
from llm_kernels.numerics.quant import QuantWeight

BF16 = torch.bfloat16


@pytest.fixture(scope="module", params=["mini", "qwen3-mini"])
def ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"g32_{request.param}")
    write_random_checkpoint(preset(request.param), d, seed=0, dtype=BF16, progress=False)
    return d


def _names(w: dict, kind) -> set[str]:
    return {n for n, t in w.items() if isinstance(t, kind)}


def test_on_load_covers_the_int8_set(ckpt):
    cfg, i8 = load_checkpoint(ckpt, dtype=BF16, quant="int8", progress=False)
    _, g32 = load_checkpoint(ckpt, dtype=BF16, quant="int8_g32", progress=False)
    assert _names(g32, GroupQuantWeight) == _names(i8, QuantWeight)
    assert not _names(g32, QuantWeight)
    for n in _names(g32, GroupQuantWeight):
        w = g32[n]
        assert w.scale.dtype == torch.float16 and tuple(w.scale.shape) == (w.shape[0], w.shape[1] // 32)


def test_stored_round_trip_and_errors(ckpt, tmp_path):
    cfg, on_load = load_checkpoint(ckpt, dtype=BF16, quant="int8_g32", progress=False)
    out = quantize_checkpoint(ckpt, tmp_path / "g32", progress=False, scheme="int8_g32")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "llm_kernels_int8_g32" and qc["group_size"] == 32
    exp = expected_tensors(cfg, "int8_g32")
    some = next(iter(_names(on_load, GroupQuantWeight)))
    assert exp[some + "_scale"].shape == (on_load[some].shape[0], on_load[some].shape[1] // 32)
    for kw in ({}, {"quant": "int8_g32"}):
        for dtype in (BF16, torch.float32):
            _, w = load_checkpoint(out, dtype=dtype, progress=False, **kw)
            for n in _names(on_load, GroupQuantWeight):
                assert isinstance(w[n], GroupQuantWeight)
                assert torch.equal(w[n].qweight, on_load[n].qweight) and torch.equal(w[n].scale, on_load[n].scale)
    for q in ("int8", "w8a8"):
        with pytest.raises(CheckpointError, match="int8_g32"):
            load_checkpoint(out, dtype=BF16, quant=q, progress=False)
    with pytest.raises(CheckpointError, match="cannot be loaded as float"):
        load_checkpoint(out, dtype=BF16, quant="none", progress=False)
    i8 = quantize_checkpoint(ckpt, tmp_path / "i8", progress=False, scheme="int8")
    with pytest.raises(CheckpointError, match="granularities"):
        load_checkpoint(i8, dtype=BF16, quant="int8_g32", progress=False)


def _rows(spec, w, cfg, backend, ids, ops=None):
    kw = {} if ops is None else {"ops": ops}
    if ops is None:
        eng = spec.make_engine(w, cfg, dtype=BF16, max_seq_len=len(ids) + 4, backend=backend)
    else:
        from llm_kernels.runtime.deepseek_v4.engine import DeepSeekV4Engine
        eng = DeepSeekV4Engine(w, cfg, dtype=BF16, max_seq_len=len(ids) + 4, **kw)
    (sid,), (lg,) = eng.prefill([ids[:24]])
    return torch.cat([lg] + [eng.decode([sid], [t])[0] for t in ids[24:]])


def test_fused_engine_matches_the_reference(ckpt):
    """24-token prefill + 12 decode steps. DeepSeek-V4 with the reference's hyper-connection
    stages: every group-scaled stage is exact, so **bitwise** equal (the fused ``hc_*``
    stages sum in another fp32 order, see ``test_int8_weights.py``). Qwen3: the fused
    engine is not bitwise the reference in any scheme (its attention sums in another order);
    each group-scaled projection stage is (``tests/kernels/common/test_common_gemm_group.py``
    and below), the logits agree to a cosine floor."""
    cfg, w = load_checkpoint(ckpt, dtype=BF16, quant="int8_g32", progress=False)
    spec = models.spec_for_config(cfg)
    ids = torch.randint(0, cfg.vocab_size, (36,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = _rows(spec, dict(w), cfg, "reference", ids)
    if spec.model_type == "deepseek_v4":
        from llm_kernels.kernels.deepseek_v4.prepare import prepare_weights
        from llm_kernels.runtime.deepseek_v4.stages import FUSED_OPS, REFERENCE_OPS

        ops = SimpleNamespace(**vars(FUSED_OPS))
        for s in ("hc_pre", "hc_pre_norm", "hc_post", "hc_post_pre_norm", "hc_head"):
            setattr(ops, s, getattr(REFERENCE_OPS, s))
        pw = prepare_weights(dict(w), cfg)
        assert _names(pw, PreparedGroupWeight) == _names(w, GroupQuantWeight)  # all packed at load
        assert torch.equal(_rows(spec, pw, cfg, None, ids, ops=ops), ref)
    fused = _rows(spec, dict(w), cfg, "fused", ids)
    cos = torch.nn.functional.cosine_similarity(fused.flatten().double(), ref.flatten().double(), dim=0)
    assert cos > 0.999, f"logits cosine {cos:.6f}"


@pytest.mark.parametrize("T", [1, 5, 19])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_qwen3_group_stages_prepared_as_one_gemm(T, dtype):
    """Qwen3's q|k|v and gate|up group-scaled weights are packed at load as ONE GEMM weight
    per stage; the stages on them are **bitwise** the reference (and the unprepared path)."""
    from llm_kernels.kernels.qwen3 import mlp as FM
    from llm_kernels.kernels.qwen3 import qkv_proj as FQ
    from llm_kernels.kernels.common.prepared import PackedGroupRows
    from llm_kernels.kernels.qwen3.group_stage import prepare_group_stage
    from llm_kernels.numerics.group_quant import quantize_weight_grouped
    from llm_kernels.reference.qwen3 import mlp as RM
    from llm_kernels.reference.qwen3 import qkv_proj as RQ

    g = torch.Generator().manual_seed(T)
    H, I = 192, 320
    x = torch.randn(T, H, generator=g).to(dtype).float()
    nw = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    qkv = tuple(quantize_weight_grouped(torch.randn(n, H, generator=g) / H ** 0.5) for n in (256, 64, 64))
    gu = tuple(quantize_weight_grouped(torch.randn(I, H, generator=g) / H ** 0.5) for _ in range(2))
    pq, pg = prepare_group_stage(qkv), prepare_group_stage(gu)
    assert all(isinstance(w, PackedGroupRows) and w.group is pq[0].group for w in pq)
    assert all(torch.equal(p.qweight, w.qweight) for p, w in zip(pq + pg, qkv + gu))
    ref = RQ.input_norm_qkv(x, nw, *qkv, 1e-6, dtype)
    for got in (FQ.input_norm_qkv(x, nw, *pq, 1e-6, dtype), FQ.input_norm_qkv(x, nw, *qkv, 1e-6, dtype)):
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert torch.equal(FM.gate_up_swiglu(x, *pg, dtype), RM.gate_up_swiglu(x, *gu, dtype))
