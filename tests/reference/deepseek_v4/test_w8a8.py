"""W8A8 golden (reference/deepseek_v4/quant.py and its use in the stages, checkpoint
format, runtime): recipes, exactness, and error bounds from the INT8 step."""

from __future__ import annotations

import pytest
import torch

from llm_kernels.errors import CheckpointError
from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint
from llm_kernels.checkpoint.writer import quantize_checkpoint
from llm_kernels.models import preset
from llm_kernels.reference.deepseek_v4 import model
from llm_kernels.reference.deepseek_v4.indexer import (indexer_keys_int8, indexer_query, indexer_query_int8,
                                                       indexer_scores, indexer_scores_int8)
from llm_kernels.numerics.quant import QuantWeight, hadamard, int8_matmul, quant_per_row, quantize_weight, w8a8_linear
from llm_kernels.reference.deepseek_v4.sparse_attn import grouped_output_proj
from llm_kernels.runtime.deepseek_v4.engine import DeepSeekV4Engine

G = torch.Generator().manual_seed(0)


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_quant_per_row_recipe():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [127.0, 0.5 * 127 / 127, -63.5]])
    q, s = quant_per_row(x)
    assert q.dtype == torch.int8 and s.shape == (3, 1)
    assert torch.equal(q[0], torch.zeros(3, dtype=torch.int8)) and s[0].item() == pytest.approx(1e-4 / 127)
    assert q[1].tolist() == [64, -127, 32]  # 1*63.5 = 63.5 -> 64 (half to even), 0.5*63.5 = 31.75 -> 32
    assert q[2].tolist() == [127, 0, -64]   # 0.5 -> 0 (half to even), -63.5 -> -64 (half to even)
    x = torch.randn(64, 300, generator=G) * 5
    q, s = quant_per_row(x)
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1) == 127).all()
    # dequant error <= half an INT8 step per element
    assert ((q.float() * s - x).abs() <= s * 0.5 + 1e-6).all()


def test_quantize_weight_per_channel_and_clamp():
    w = torch.randn(37, 100, generator=G)
    qw = quantize_weight(w)
    assert qw.qweight.dtype == torch.int8 and qw.scale.shape == (37,)
    assert qw.qweight.abs().max() <= 127
    assert ((qw.dequantize() - w).abs() <= qw.scale[:, None] * 0.5 + 1e-6).all()
    with pytest.raises(TypeError):
        QuantWeight(qw.qweight.float(), qw.scale)


def test_int8_matmul_is_exact():
    a = torch.randint(-127, 128, (5, 7168), generator=G, dtype=torch.int8)
    b = torch.randint(-127, 128, (9, 7168), generator=G, dtype=torch.int8)
    ref = (a.long().unsqueeze(1) * b.long().unsqueeze(0)).sum(-1)
    assert torch.equal(int8_matmul(a, b).long(), ref)


def test_hadamard_sylvester_orthonormal():
    h = hadamard(8)
    assert torch.allclose(h @ h.T, torch.eye(8), atol=1e-6) and torch.equal(h, h.T)
    assert torch.equal(torch.sign(h[1]), torch.tensor([1., -1, 1, -1, 1, -1, 1, -1]))  # natural order
    with pytest.raises(ValueError):
        hadamard(96)


def test_w8a8_linear_error_within_int8_steps():
    x = torch.randn(8, 512, generator=G)
    w = torch.randn(64, 512, generator=G) / 512 ** 0.5
    y = w8a8_linear(x, quantize_weight(w))
    ref = x @ w.T
    # both operands carry <= 1/2 step relative-to-amax error per element; over K=512 random
    # terms the result error is ~ sqrt(K) * step products: bound rel-L2 by 2 %
    assert (y - ref).norm() / ref.norm() < 0.02
    assert _cos(y, ref) > 0.999


def test_int8_indexer_matches_float_indexer():
    T, N, IH, IHD, QL, D = 6, 40, 16, 32, 48, 64
    qr = torch.randn(T, QL, generator=G)
    x = torch.randn(T, D, generator=G)
    wq = torch.randn(IH * IHD, QL, generator=G) / QL ** 0.5
    wp = torch.randn(IH, D, generator=G) / D ** 0.5
    keys = torch.randn(N, IHD, generator=G)
    pos = torch.arange(100, 100 + T)
    from llm_kernels.reference.deepseek_v4.common import rope_cos_sin
    cos, sin = rope_cos_sin(preset("mini").rope_compress, 16, pos, torch.float32)
    qf, wf = indexer_query(qr, x, wq, wp, cos, sin, n_heads=IH, head_dim=IHD, dtype=torch.float32)
    ref = indexer_scores(qf, wf, keys)
    qi, qs, wi = indexer_query_int8(qr, x, quantize_weight(wq), wp, cos, sin, n_heads=IH, head_dim=IHD,
                                    dtype=torch.float32)
    got = indexer_scores_int8(qi, qs, wi, *indexer_keys_int8(keys))
    # INT8 q, k and wq_b plus bf16 roundings: scores agree to cosine 0.999 and rank alike
    assert _cos(got, ref) > 0.999
    top_ref = ref.topk(10, dim=1).indices
    top_got = got.topk(10, dim=1).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_ref, top_got)) / top_ref.numel()
    assert overlap >= 0.8


def test_grouped_output_proj_per_group_quant():
    T, G_, OL, H, HD, D = 3, 4, 16, 8, 32, 48
    o = torch.randn(T, H, HD, generator=G)
    wa = torch.randn(G_ * OL, H * HD // G_, generator=G) / 64 ** 0.5
    wb = torch.randn(D, G_ * OL, generator=G) / (G_ * OL) ** 0.5
    ref = grouped_output_proj(o, wa, wb, o_groups=G_, dtype=torch.float32)
    qwb = quantize_weight(wb)
    got = grouped_output_proj(o, wa, qwb, o_groups=G_, dtype=torch.float32)
    assert _cos(got, ref) > 0.999
    # per-group scales: scaling one group's input by 1000 leaves the other groups' error unchanged
    o2 = o.clone()
    o2[:, : H // G_] *= 1000
    r = grouped_output_proj(o2, wa, wb, o_groups=G_, dtype=torch.float32)
    g = grouped_output_proj(o2, wa, qwb, o_groups=G_, dtype=torch.float32)
    assert (g - r).norm() / r.norm() < 0.02


@pytest.fixture(scope="module")
def mini_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("w8a8")
    f = write_random_checkpoint(preset("mini"), root / "bf16", seed=5, dtype=torch.bfloat16, progress=False)
    q = quantize_checkpoint(f, root / "w8a8", progress=False)
    return f, q


def test_w8a8_checkpoint_round_trip_and_errors(mini_ckpts, tmp_path):
    f, q = mini_ckpts
    cfg, wq = load_checkpoint(q, dtype=torch.bfloat16, progress=False)
    _, wq2 = load_checkpoint(f, dtype=torch.bfloat16, progress=False, quant="w8a8")
    n_q = [k for k, v in wq.items() if isinstance(v, QuantWeight)]
    assert len(n_q) == 4 * (2 + 3 + 3 * cfg.n_routed_experts) + 2  # wq_b, wo_b, shared, routed (+2 CSA indexers)
    for k in n_q:
        assert torch.equal(wq[k].qweight, wq2[k].qweight) and torch.equal(wq[k].scale, wq2[k].scale)
    assert not isinstance(wq["layers.0.attn.wq_a.weight"], QuantWeight)
    with pytest.raises(CheckpointError, match="W8A8"):
        load_checkpoint(q, quant="none", progress=False)
    with pytest.raises(CheckpointError, match="already"):
        quantize_checkpoint(q, tmp_path / "again", progress=False)
    # an INT8 weight stored as float is refused, naming it
    from safetensors.torch import load_file, save_file
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(q, bad)
    t = load_file(str(bad / "model.safetensors"))
    t["layers.1.attn.wq_b.weight"] = t["layers.1.attn.wq_b.weight"].float()
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="layers.1.attn.wq_b.weight"):
        load_checkpoint(bad, progress=False)


def test_w8a8_layer_outputs_close_to_bf16(mini_ckpts):
    """Per layer, same bf16 input: W8A8 vs bf16 output cosine >= 0.999 (issue criterion)."""
    f, _ = mini_ckpts
    cfg, wb = load_checkpoint(f, dtype=torch.bfloat16, progress=False)
    _, wq = load_checkpoint(f, dtype=torch.bfloat16, progress=False, quant="w8a8")
    ids = torch.randint(0, cfg.vocab_size, (200,), generator=G)
    x = model.embed(wb, cfg, ids, torch.bfloat16)
    for layer in range(cfg.num_hidden_layers):
        lb, lq = model.LayerWeights(wb, layer), model.LayerWeights(wq, layer)
        a_b = model.attention_sublayer(lb, cfg, layer, x, torch.bfloat16)
        a_q = model.attention_sublayer(lq, cfg, layer, x, torch.bfloat16)
        assert _cos(a_q - x, a_b - x) >= 0.999, f"layer {layer} attention update"
        m_b = model.moe_sublayer(lb, cfg, layer, a_b, ids, torch.bfloat16)
        m_q = model.moe_sublayer(lq, cfg, layer, a_b, ids, torch.bfloat16)
        assert _cos(m_q - a_b, m_b - a_b) >= 0.999, f"layer {layer} moe update"
        x = m_b


def test_w8a8_engine_matches_stateless_reference(mini_ckpts):
    _, q = mini_ckpts
    cfg, w = load_checkpoint(q, dtype=torch.float32, progress=False)
    ids = torch.randint(0, cfg.vocab_size, (150,), generator=G)
    full = model.forward(w, cfg, ids, torch.float32)
    # engine prefill runs the same GEMM shapes as the stateless forward: exact (fp32 bound)
    eng = DeepSeekV4Engine(w, cfg, torch.float32, max_seq_len=150)
    (sid,), (pre,) = eng.prefill([ids.tolist()])
    assert (pre - full).abs().max().item() <= 1e-4
    # decode: torch GEMMs at M=1 differ from M=150 by fp32 ulps, which can flip an INT8
    # rounding step of the per-token activation quant; the random model amplifies such
    # flips (as it amplifies bf16 vs fp32). Observed on mini: min row cosine 0.970, overall
    # > 0.99. Bounds: overall cosine >= 0.98, every row >= 0.9. Bit-exact decode ==
    # re-prefill is a property of the per-row fused kernels and is tested there.
    eng = DeepSeekV4Engine(w, cfg, torch.float32, max_seq_len=150)
    (sid,), (pre,) = eng.prefill([ids[:20].tolist()])
    got = torch.cat([pre] + [eng.decode([sid], [int(t)])[0] for t in ids[20:]])
    assert _cos(got, full) >= 0.98
    rows = torch.nn.functional.cosine_similarity(got.double(), full.double(), dim=1)
    assert rows.min().item() >= 0.9
    st = eng.seqs[sid].layers[1].indexer
    k_i8, k_s = st.valid_int8_keys()
    assert k_i8.dtype == torch.int8 and k_i8.shape[0] == 150 // 4 and (k_s > 0).all()
    # the cached INT8 keys equal the stateless recomputation of the indexer keys
    from llm_kernels.reference.deepseek_v4.model import _compress_all
    lw = model.LayerWeights(w, 1)
    x = model.embed(w, cfg, ids, torch.float32)
    x = model.attention_sublayer(model.LayerWeights(w, 0), cfg, 0, x, torch.float32)
    x = model.moe_sublayer(model.LayerWeights(w, 0), cfg, 0, x, ids, torch.float32)
    xn = model.attention_prologue(lw, cfg, 1, x, torch.arange(150), torch.float32)[0]
    keys = _compress_all(lambda n: lw[n], cfg, xn, torch.arange(150), 1, True, torch.float32,
                         "attn.indexer.compressor.")
    ref_i8, _ = indexer_keys_int8(keys)
    assert (ref_i8.int() - k_i8.int()).abs().max().item() <= 1  # one INT8 step at most
