"""MoE sublayer: ``gate`` (router incl. hash routing), ``expert_shared``,
``expert_routed`` and their combination ``moe``.

Spec: ``shared/design/deepseek_v4_architecture.md`` §10 (float path; paper §2.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...numerics.linear import linear
from ...numerics.rounding import rnd

__all__ = ["score_fn", "gate", "expert_swiglu", "moe"]


def score_fn(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Router affinity from logits [T, E]: ``sqrtsoftplus`` = sqrt(softplus(l)),
    ``sigmoid``, or ``softmax`` over experts. Raises ValueError for another name."""
    if scoring_func == "sqrtsoftplus":
        return torch.sqrt(F.softplus(logits))
    if scoring_func == "sigmoid":
        return torch.sigmoid(logits)
    if scoring_func == "softmax":
        return torch.softmax(logits, dim=-1)
    raise ValueError(f"scoring_func must be sqrtsoftplus, sigmoid or softmax, got {scoring_func!r}")


def gate(x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor | None, tid2eid: torch.Tensor | None,
         input_ids: torch.Tensor, *, top_k: int, scoring_func: str, norm_topk_prob: bool,
         routed_scaling_factor: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to ``top_k`` experts (spec §10.1).

    Args:
        x: [T, D] ffn-normed input; gate_w: [E, D]; bias: [E] ``e_score_correction_bias``
        (selection only) or None on hash layers; tid2eid: [V, K] int expert table (hash
        layers) or None; input_ids: [T] int (used by hash routing).
    Returns:
        weights [T, K] float32 (scores of the chosen experts, normalised to sum 1 when
        ``norm_topk_prob``, times ``routed_scaling_factor``), indices [T, K] int64.
    Selection: hash layers take ``tid2eid[input_id]``; otherwise top-k of score + bias.
    """
    # Scores, their normalisation and scaling run in the activation dtype (each op rounds),
    # as in bf16 inference; selection adds the fp32 bias.
    scores = score_fn(linear(x, gate_w, dtype).to(dtype), scoring_func)
    if tid2eid is not None:
        indices = tid2eid[input_ids.long()].long()
    else:
        sel = scores.float() + (bias.float() if bias is not None else 0.0)
        indices = torch.topk(sel, top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return (weights * routed_scaling_factor).float(), indices


def expert_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, *,
                  swiglu_limit: float, dtype: torch.dtype) -> torch.Tensor:
    """One SwiGLU expert (spec §10.2): ``w2 · (silu(min(x w1ᵀ, L)) ⊙ clamp(x w3ᵀ, -L, L))``.
    x [T, D]; w1, w3 [I, D]; w2 [D, I] -> [T, D]. ``swiglu_limit`` L = 0 disables the clamps."""
    g = linear(x, w1, dtype)
    u = linear(x, w3, dtype)
    if swiglu_limit > 0:
        g = g.clamp(max=swiglu_limit)
        u = u.clamp(min=-swiglu_limit, max=swiglu_limit)
    h = rnd(rnd(F.silu(g), dtype) * u, dtype)
    return linear(h, w2, dtype)


def moe(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: list[tuple[torch.Tensor, ...]],
        shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, swiglu_limit: float,
        dtype: torch.dtype) -> torch.Tensor:
    """Shared expert plus weighted routed experts (spec §10.2).

    Args:
        x: [T, D] ffn-normed input; weights/indices: [T, K] from :func:`gate`;
        experts: per expert (w1, w3, w2); shared: (w1, w3, w2).
    Returns:
        [T, D] = shared(x) + Σ_k weights[t,k] · expert_{indices[t,k]}(x[t]). Each weighted
        routed output is rounded to ``dtype``; the K of a token are summed in float32 and
        rounded once (as transformers' default grouped experts backend and spec §10.2), then
        the shared output is added.
    """
    T, K = indices.shape
    per_slot = torch.zeros(T, K, x.shape[-1])
    for e in torch.unique(indices).tolist():
        tok, slot = torch.where(indices == e)
        y = expert_swiglu(x[tok], *experts[e], swiglu_limit=swiglu_limit, dtype=dtype)
        per_slot[tok, slot] = rnd(y * weights[tok, slot].unsqueeze(-1), dtype)
    routed = rnd(per_slot.sum(dim=1), dtype)
    sh = expert_swiglu(x, *shared, swiglu_limit=swiglu_limit, dtype=dtype)
    return rnd(routed + sh, dtype)
