"""Fused backend: decode after prefill vs a full re-prefill of the same tokens.

Every row (logits of one position) is checked. In bf16 the two runs differ by where fp32
sums are rounded (T=1 Numba GEMV vs T>1 torch GEMM, other blockings), i.e. by bf16 (and,
for W8A8, INT8 activation) rounding noise. That noise is continuous except at discrete
decisions: the MoE router's top-k and the indexer's top-k. A router score that sits on a
tie at the k-th expert can land on either side, and then the row runs a *different
expert*, i.e. a different function, for the rest of that layer: no bound on the logits
follows from the numerics. So the test records the router's choices in both runs and

* rows where the router picked the same experts in every layer: relative L2 difference of
  the logits <= 0.1. Derivation: a bf16 run of this random mini model is within ~5 %
  (relative L2, 90th percentile; median 1.3 % float / 3.1 % W8A8) of the fp32 run on rows
  with the same routing (measured with the same checkpoint and tokens); two bf16 runs each
  within that of the fp32 trajectory are within 2 x 5 % of each other. Indexer top-k swaps
  are included here (they swap entries of near-equal score, whose attention weights are
  near-equal too). Observed worst: 1.7 % (float), 2.5 % (W8A8).
* rows where the router's choice differs: it must be a near-tie, i.e. exactly one expert
  swapped in one layer, the two swapped experts' selection scores (score + bias) within
  10 % of each other in each run and the row's selection scores of the two runs within 10 %
  (relative L2) of each other -- the same two-run noise bound as below, so rounding noise
  can reverse that order (observed gaps 0.2 % .. 3.7 %, scores moved 0.2 % .. 2.9 %); such a row
  is not bounded (observed: row 102 in bf16 float, cosine 0.876; rows 131, 136, 145
  in bf16 W8A8, cosine 0.93 .. 0.98 -- every row below 0.99 is one of these).

The fp32 run has no such flips on this input: every row within 1e-4 absolute.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint
from llm_kernels.models import preset
from llm_kernels.runtime.deepseek_v4.engine import DeepSeekV4Engine
from llm_kernels.numerics.linear import linear as r_linear
from llm_kernels.reference.deepseek_v4.moe import score_fn
from llm_kernels.runtime.deepseek_v4.stages import FUSED_OPS

N_TOKENS, N_PREFILL = 150, 20
#: Two bf16 runs of this model differ by up to 2 x 5 % (relative L2, see the module
#: docstring) in the hidden states, hence in the router's selection scores: a router swap is
#: a near-tie when, in each run, the two swapped experts' selection scores are within this
#: relative gap, and the row's selection-score vectors of the two runs are within it too
#: (the flip came from rounding noise, not from a wrong input to the router).
TIE_REL = 0.1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(preset("mini"), tmp_path_factory.mktemp("dp") / "m", seed=0,
                                   dtype=torch.bfloat16, progress=False)


def _recording_ops(log: list):
    """FUSED_OPS with ``gate`` recording, per call, the selection scores ``score + bias``
    (recomputed with the reference's formula from the gate's inputs; None on hash layers)
    and the chosen indices."""
    ops = dict(vars(FUSED_OPS))
    gate = ops["gate"]

    def recording_gate(x, gate_w, bias, tid2eid, input_ids, **k):
        w, idx = gate(x, gate_w, bias, tid2eid, input_ids, **k)
        sel = None
        if tid2eid is None:
            scores = score_fn(r_linear(x, gate_w, k["dtype"]).to(k["dtype"]), k["scoring_func"]).float()
            sel = scores + (bias.float() if bias is not None else 0.0)
        log.append((sel, idx.detach().clone()))
        return w, idx

    ops["gate"] = recording_gate
    return SimpleNamespace(**ops)


def _per_position(log: list, n_layers: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """[position][layer] -> (selection scores [E], indices [K]) from the gate calls in call order
    (each forward calls the gate once per layer, in layer order, over its rows)."""
    out: list[list] = []
    for f in range(0, len(log), n_layers):
        calls = log[f:f + n_layers]
        for r in range(calls[0][1].shape[0]):
            out.append([(None if sel is None else sel[r], i[r]) for sel, i in calls])
    return out


def _run(ckpt, dtype, quant):
    cfg, w = load_checkpoint(ckpt, dtype=dtype, progress=False, quant=quant)
    ids = [(11 * i + 5) % cfg.vocab_size for i in range(N_TOKENS)]  # crosses position 127 (HCA emits)
    full_log, dec_log = [], []
    e = DeepSeekV4Engine(w, cfg, dtype, max_seq_len=N_TOKENS, ops=_recording_ops(full_log))
    _, (full,) = e.prefill([ids])
    n_layers = len(full_log)
    e = DeepSeekV4Engine(w, cfg, dtype, max_seq_len=N_TOKENS, ops=_recording_ops(dec_log))
    (s,), (pre,) = e.prefill([ids[:N_PREFILL]])
    got = torch.cat([pre] + [e.decode([s], [t])[0] for t in ids[N_PREFILL:]])
    routes = (_per_position(full_log, n_layers), _per_position(dec_log, n_layers))
    assert len(routes[0]) == len(routes[1]) == N_TOKENS == got.shape[0] == full.shape[0]
    return got, full, routes


def _router_flips(routes) -> dict[int, list[str]]:
    """position -> descriptions of the layers where decode and re-prefill routed differently."""
    flips: dict[int, list[str]] = {}
    for p, (rf, rd) in enumerate(zip(*routes)):
        for layer, ((sel_f, i_f), (sel_d, i_d)) in enumerate(zip(rf, rd)):
            sf, sd = set(i_f.tolist()), set(i_d.tolist())
            if sf == sd:
                continue
            only_f, only_d = sorted(sf - sd), sorted(sd - sf)
            desc = f"layer {layer}: re-prefill {only_f} vs decode {only_d}"
            near_tie = False
            if len(only_f) == len(only_d) == 1 and sel_f is not None and sel_d is not None:
                a, b = only_f[0], only_d[0]
                # in each run, the two experts' selection scores (score + bias) are within
                # bf16 noise of each other: the swap is a tie decided by rounding
                gaps = [abs(float(s[a] - s[b])) / max(abs(float(s[a])), abs(float(s[b]))) for s in (sel_f, sel_d)]
                moved = float((sel_f - sel_d).norm() / sel_f.norm())
                near_tie = max(gaps) <= TIE_REL and moved <= TIE_REL
                desc += (f", selection-score gaps {gaps[0]:.3g} (re-prefill) / {gaps[1]:.3g} (decode), "
                         f"scores moved {moved:.3g}")
            flips.setdefault(p, []).append(desc + ("" if near_tie else " NOT A NEAR-TIE"))
    return flips


def test_fused_fp32_decode_equals_reprefill(ckpt):
    got, full, _ = _run(ckpt, torch.float32, None)
    # fp32: only GEMM shapes/summation order differ (T=1 Numba GEMV vs T>1 torch GEMM);
    # observed 3.8e-6 on logits of scale ~5. Bound 1e-4 (~170 fp32 ulps at 5), every row.
    assert (got - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("quant", [None, "w8a8"])
def test_fused_bf16_decode_close_to_reprefill(ckpt, quant):
    got, full, routes = _run(ckpt, torch.bfloat16, quant)
    flips = _router_flips(routes)
    # a router flip is legal only as a near-tie: one expert swapped in one layer
    for p, descs in flips.items():
        assert len(descs) == 1 and "NOT A NEAR-TIE" not in descs[0], (p, descs)
    print(f"router flips ({quant}):", flips)
    rel = ((got.double() - full.double()).norm(dim=1) / full.double().norm(dim=1))
    same_routing = [p for p in range(N_TOKENS) if p not in flips]
    bad = {p: round(rel[p].item(), 4) for p in same_routing if rel[p] > 0.1}
    assert not bad, f"rows with identical routing differ by more than 10 % (relative L2): {bad}; flips: {flips}"
    # the whole tensor (flipped rows included) stays close: observed cosine 0.9990 .. 0.9991
    cos = torch.nn.functional.cosine_similarity(got.flatten().double(), full.flatten().double(), dim=0).item()
    assert cos >= 0.995, (cos, flips)
