"""Load-time weight preparation for the fused DeepSeek-V4 kernels (``FUSED_OPS.prepare_weights``).

:func:`prepare_weights` runs once when the engine is built and returns a new dict in which
every W8A8 weight a fused kernel reads is replaced by its packed form
(:mod:`llm_kernels.kernels.common.prepared`):

* ``layers.*.attn.wq_b`` / ``layers.*.attn.indexer.wq_b`` -> :class:`PackedLinear` in the
  per-head layout (:func:`.w8a8_heads.prepare_heads`; read by ``qkv_proj_rope`` /
  ``indexer_query*``);
* ``layers.*.attn.wo_b`` -> :class:`PackedColumnGroups`, one packed slice per output group
  (:func:`.output_proj.prepare_wo_b`; ``grouped_output_proj``), the slices stacked for
  the one-region decode path (:mod:`.output_proj_int8`);
* ``layers.*.ffn.shared_experts.w1/w3/w2`` and ``layers.*.ffn.experts.<e>.w1/w3/w2`` ->
  three :class:`PackedRows` sharing one :class:`~.moe.ExpertPack` (``[w1; w3]`` as one
  GEMM weight, w2; :func:`.moe.prepare_expert`; ``moe``); then each layer's packs are
  stacked (:func:`.moe_multi.stack_experts`: one ``[E+1, bytes]`` array per weight, the
  packs become views of it) so a decode step runs all its experts in one region;
* ``head.weight`` when it is W8A8 -> :class:`PackedLinear` (:func:`.linear.prepare_linear`);
* group-scaled INT8 weights (the ``int8_g32`` scheme, :class:`GroupQuantWeight`): an
  expert's w1/w3 as two ``PackedGroupRows`` of one pack and w2 a ``PackedGroupLinear``, ``wo_a`` as
  ``PackedGroupRowGroups``, every other one (wq_b, indexer wq_b and wo_b included: their
  stages run the group-scaled GEMM, then the float path's epilogue) as ``PackedGroupLinear``;
* MXFP4 routed experts (:class:`~llm_kernels.numerics.mxfp4.MXFP4Weight`, kept 4-bit):
  w1/w3 as two ``PackedMXFP4Rows`` of one W4A8 pack, w2 a ``PackedMXFP4Linear``
  (:mod:`..common.gemm_mxfp4`'s layout: still 4 bits per weight + 1 scale byte per 32),
  then each layer's MXFP4 experts stacked (:func:`.moe_multi.stack_mxfp4_experts`) so a
  decode step runs all its routed experts in one W4A8 region per weight; the other
  weights may be of any kind;
* the ``int8`` scheme's further INT8 weights: ``layers.*.attn.wo_a`` ->
  :class:`PackedRowGroups` (one packed row slice per group, :func:`.output_proj.prepare_wo_a`),
  and every other INT8 linear (wq_a, wkv, compressor wkv/wgate, indexer weights_proj) ->
  :class:`PackedLinear` (read through :func:`.stage_shared.linear_pair`); the pairs
  ``wq_a`` | ``wkv`` and each compressor's ``wkv`` | ``wgate`` then become two
  :class:`PackedRows` of one :class:`.stage_shared.PairPack` (one GEMM per stage).

Everything else (float weights, norms, HC parameters, ``tid2eid``) is passed through: the
kernels read zero-copy views of float tensors, made once here (float32, or bf16 bits)
(:func:`..common.bf16.attach_kernel_views`; the wrappers then skip a tensor conversion per
weight and call). The prepared weights are still
``QuantWeight`` instances (same ``shape`` and ``scale``), so the engine's dispatch is
unchanged; they do not keep the raw int8 tensors unless the kernel layout is that tensor
(plain ``"nk"`` layout of a single weight, e.g. without VNNI).
"""

from __future__ import annotations

import re
from typing import Any

from ...numerics.group_quant import GroupQuantWeight
from ...numerics.mxfp4 import MXFP4Weight
from ...numerics.quant import QuantWeight
from ..common.bf16 import attach_kernel_views
from ..common.linear import prepare_linear
from ..common.prepared import PackedMXFP4Linear, is_int8_weight, mxfp4_rows_pack
from ..common.prepared import stage_group
from .moe import ExpertPack, prepare_expert
from .moe_multi import stack_experts, stack_mxfp4_experts
from .stage_shared import PairPack, pack_pair
from .output_proj import prepare_wo_a, prepare_wo_b
from .w8a8_heads import prepare_heads

__all__ = ["prepare_weights"]

_LAYER = re.compile(r"^((?:layers|mtp)\.\d+\.)(.+)$")  # a decoder layer or an MTP block
_EXPERT_W1 = re.compile(r"^(ffn\.(?:shared_experts|experts\.\d+)\.)w1\.weight$")
_EXPERT = re.compile(r"^ffn\.(?:shared_experts|experts\.\d+)\.w[123]\.weight$")


def prepare_weights(weights: dict[str, Any], cfg: Any, consume: bool = False) -> dict[str, Any]:
    """A new dict: ``weights`` with the W8A8 weights of the fused kernels packed (see the
    module docstring). ``cfg`` supplies ``head_dim``, ``index_head_dim`` and ``o_groups``.
    Idempotent. The input dict is not modified unless ``consume``: then each of its entries
    is replaced by the prepared form as soon as that is made, so a raw INT8 tensor the
    caller no longer references elsewhere is freed right away (peak memory: the weights
    plus one packed weight, not two copies of every INT8 weight)."""
    out = dict(weights)
    for name in list(weights):
        w = weights[name]
        if isinstance(w, MXFP4Weight):
            m = _LAYER.match(name)
            e = _EXPERT_W1.match(m.group(2)) if m is not None else None
            if e is not None:
                _prepare_expert(weights, out, [m.group(1) + e.group(1) + f"{j}.weight" for j in ("w1", "w3", "w2")],
                                consume)
            continue
        if not is_int8_weight(w) or isinstance(getattr(w, "group", None), PairPack):
            continue
        grouped = not isinstance(w, QuantWeight)
        m = _LAYER.match(name)
        layer, key = m.groups() if m is not None else ("", name)
        if name == "head.weight":
            out[name] = prepare_linear(w)
        elif m is None:
            continue
        elif grouped and key in ("attn.wq_b.weight", "attn.indexer.wq_b.weight", "attn.wo_b.weight"):
            out[name] = prepare_linear(w)  # one group-scaled GEMM, then the float path's epilogue
        elif key == "attn.wq_b.weight":
            out[name] = prepare_heads(w, cfg.head_dim)
        elif key == "attn.indexer.wq_b.weight":
            out[name] = prepare_heads(w, cfg.index_head_dim)
        elif key == "attn.wo_b.weight":
            out[name] = prepare_wo_b(w, cfg.o_groups)
        elif key == "attn.wo_a.weight":
            out[name] = prepare_wo_a(w, cfg.o_groups)
        elif _EXPERT.match(key) is None:
            out[name] = prepare_linear(w)
        else:
            e = _EXPERT_W1.match(key)
            if e is None:
                continue
            _prepare_expert(weights, out, [layer + e.group(1) + f"{j}.weight" for j in ("w1", "w3", "w2")], consume)
            continue
        if consume:
            weights[name] = out[name]
    _stack_layer_experts(out)
    _pack_pairs(out, weights if consume else None)
    attach_kernel_views(out.values())
    return out


#: ``linear_pair`` stages whose two INT8 weights run as one GEMM (:class:`.stage_shared.PairPack`)
_PAIRS = (("attn.wq_a.weight", "attn.wkv.weight"),
          ("attn.compressor.wkv.weight", "attn.compressor.wgate.weight"),
          ("attn.indexer.compressor.wkv.weight", "attn.indexer.compressor.wgate.weight"))


def _pack_pairs(out: dict[str, Any], consumed: dict[str, Any] | None) -> None:
    """Replace each layer's per-row INT8 ``linear_pair`` weights by two rows of one pack
    (:func:`.stage_shared.pack_pair`); pairs of other kinds are left as they are."""
    prefixes = {m.group(1) for m in map(_LAYER.match, out) if m is not None}
    for p in prefixes:
        for a, b in _PAIRS:
            if p + a in out and p + b in out:
                pr = pack_pair(out[p + a], out[p + b])
                if pr is not None:
                    out[p + a], out[p + b] = pr
                    if consumed is not None:
                        consumed[p + a], consumed[p + b] = pr


def _stack_layer_experts(out: dict[str, Any]) -> None:
    """Stack each layer's prepared W8A8 experts (routed and shared,
    :func:`.moe_multi.stack_experts`) and its prepared MXFP4 experts
    (:func:`.moe_multi.stack_mxfp4_experts`) so a decode step runs them in one parallel
    region per weight; layers already stacked, or whose experts cannot be (other kinds,
    plain layout), are left as they are."""
    by_layer: dict[str, list] = {}
    mx_layer: dict[str, list] = {}
    for name, w in out.items():
        m = _LAYER.match(name)
        e = _EXPERT_W1.match(m.group(2)) if m is not None else None
        if not e:
            continue
        w3, w2 = out.get(name[:-len("w1.weight")] + "w3.weight"), out.get(name[:-len("w1.weight")] + "w2.weight")
        g = stage_group((w, w3, w2), ExpertPack)
        if g is not None:
            by_layer.setdefault(m.group(1), []).append(g)
        g4 = mxfp4_rows_pack((w, w3)) if w3 is not None else None
        if g4 is not None and isinstance(w2, PackedMXFP4Linear):
            mx_layer.setdefault(m.group(1), []).append((g4, w2.pack))
    for packs in by_layer.values():
        if all(p.stack is None for p in packs):
            stack_experts(packs)
    for experts in mx_layer.values():  # MXFP4 experts (a release's routed ones) kept 4-bit
        if all(g.stack is None for g, _ in experts):
            stack_mxfp4_experts(experts)


def _kind(w: Any) -> type | None:
    """The quantised weight class of ``w`` (prepared forms included), None for a float one."""
    for t in (QuantWeight, GroupQuantWeight, MXFP4Weight):
        if isinstance(w, t):
            return t
    return None


def _prepare_expert(weights: dict[str, Any], out: dict[str, Any], names: list[str], consume: bool) -> None:
    """``out[n]`` = the prepared w1/w3/w2 ``names`` of one expert when they are quantised
    weights of one kind (W8A8, group-scaled INT8 or MXFP4); else nothing."""
    ws = [weights.get(n) for n in names]
    kinds = {_kind(x) for x in ws}
    if len(kinds) == 1 and None not in kinds:
        for n, p in zip(names, prepare_expert(*ws)):
            out[n] = p
            if consume:
                weights[n] = p
