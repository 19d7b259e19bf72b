"""Prefill / decode step driver for DeepSeek-V4 over explicit caches, for a batch of
sequences of different lengths.

Tokens of all sequences in a step are packed into one [ΣT] axis for the per-token stages
(hc_pre/hc_post, norms, qkv_proj_rope, gate, experts, lm_head); each sequence attends its
own KV pool laid out as ``[window rows | this step's rows | compressed entries]``, all
sequences in one ragged attention call per layer (``sparse_attn_core_ragged``). The stage functions come from an ``ops`` namespace (:mod:`.stages`:
``REFERENCE_OPS``, the torch reference, or ``FUSED_OPS``, the kernels). Sequence
bookkeeping, validation and logits rows are the shared :class:`EngineCore`'s; the
per-layer sublayers :meth:`DeepSeekV4Engine.attention_block` and
:meth:`DeepSeekV4Engine.ffn_block` are public so the layer benchmark can time them.

Spec: ``shared/design/deepseek_v4_architecture.md`` §2, §7.3, §9.1, §11.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch

from ...errors import CacheOverflowError
from ...models.deepseek_v4.config import HCA, SLIDING, DeepSeekV4Config
from ...numerics.group_quant import GroupQuantWeight
from ...numerics.quant import QuantWeight
from ...numerics.rounding import rnd
from ...reference.deepseek_v4 import model as _model
from ..engine_core import EngineCore
from ..rope_table import RopeTables
from ..timing import StageTimer
from .cache import CompressorState, SequenceCache, StepJournal
from .stages import REFERENCE_OPS

__all__ = ["DeepSeekV4Engine", "CacheOverflowError"]


def _window_rows(pos: np.ndarray, W: int, start) -> np.ndarray:
    """Pool rows of each query's window: query at position p attends positions p-W+1 … p,
    which sit at pool row ``position - start`` (the window's first row is position
    ``start``); -1 for positions before ``max(start, 0)``. ``pos`` [T] int64, ``start`` an
    int or one per query [T, 1] int64 -> [T, W] int64."""
    offsets = _WINDOW_OFFSETS.get(W)
    if offsets is None:
        offsets = _WINDOW_OFFSETS[W] = np.arange(1 - W, 1)
    if pos.shape[0] == 1 and isinstance(start, int) and start >= 0:  # one query (decode): two numpy ops
        return np.maximum(offsets + (int(pos[0]) - start), -1)[None, :]  # rows before start: < 0 -> -1
    wpos = pos[:, None] + offsets
    return np.where(wpos >= np.maximum(start, 0), wpos - start, -1)


_WINDOW_OFFSETS: dict[int, np.ndarray] = {}  # W -> [1-W … 0]


class DeepSeekV4Engine(EngineCore):
    """Runs DeepSeek-V4 incrementally over per-sequence caches.

    Args:
        weights: canonical-name tensors (``llm_kernels.checkpoint.load_checkpoint``).
        cfg: the model config.
        dtype: activation storage dtype, ``torch.float32`` or ``torch.bfloat16``.
        max_seq_len: cache capacity per sequence (tokens); exceeding it raises
            :class:`CacheOverflowError`.
        ops: stage implementations (default :data:`.stages.REFERENCE_OPS`).
        timer: optional :class:`StageTimer` collecting per-stage seconds.
        consume_weights: let the backend's ``prepare_weights`` replace the entries of
            ``weights`` by their packed forms as it goes (frees each raw INT8 tensor once
            packed: the load peak stays near the weights' size; the caller's dict then
            holds prepared weights).
        layers: ``(first, stop)``: this pipeline stage's decoder layers (``weights`` need hold
            only those, plus the embedding on the first stage and ``hc_head`` / norm / head on
            the last); its ``pipe`` link is set by :mod:`llm_kernels.distributed`. Default:
            every layer. (Each sequence's cache keeps an entry per layer; the other stages'
            stay empty.) MTP drafting needs every layer in one engine.

    Raises ValueError for a bad ``layers`` or ``max_seq_len``.
    """

    def __init__(self, weights: dict[str, torch.Tensor], cfg: DeepSeekV4Config,
                 dtype: torch.dtype = torch.float32, max_seq_len: int = 4096,
                 ops: SimpleNamespace = REFERENCE_OPS, timer: StageTimer | None = None,
                 consume_weights: bool = False, layers: tuple[int, int] | None = None):
        super().__init__(cfg, dtype, timer)
        first, stop = (0, cfg.num_hidden_layers) if layers is None else layers
        if not 0 <= first < stop <= cfg.num_hidden_layers:
            raise ValueError(f"layers must be (first, stop) with 0 <= first < stop <= num_hidden_layers="
                             f"{cfg.num_hidden_layers}, got {layers}")
        self.layer_ids = range(first, stop)
        self.max_seq_len, self.ops = max_seq_len, ops
        self.seqs: dict[int, SequenceCache] = {}
        #: speculative decoding: journal every step (``journal``: seq id -> StepJournal of
        #: the last step) so that :meth:`rewind` can drop its rejected rows
        self.journaling, self.journal = False, None
        self.last_hidden: torch.Tensor | None = None
        self.rope = RopeTables(ops.rope_cos_sin, dtype)  # cos/sin by position, tabulated once per profile
        SequenceCache.create(cfg, max_seq_len)  # validates max_seq_len early
        self.w = ops.prepare_weights(weights, cfg, consume=consume_weights)  # load-time kernel form
        self._layer_views: dict[int, _model.LayerWeights] = {}  # by layer id (MTP block: its id)
        #: ``(x_hc, xn, post, comb)``: a sublayer's output streams and the next sublayer's
        #: hc_pre + norm, computed in the same call (``hc_post_pre_norm``); the next sublayer
        #: uses them when it is called with that very ``x_hc``
        self._handoff: tuple | None = None

    # ------------------------------------------------------------------ EngineCore hooks
    def _new_sequence(self, sid: int) -> None:
        self.seqs[sid] = SequenceCache.create(self.cfg, self.max_seq_len)

    def _drop_sequence(self, sid: int) -> None:
        self.seqs.pop(sid)

    def _length(self, sid: int) -> int:
        return self.seqs[sid].length

    def _reserve(self, seq_ids: Sequence[int], lens: Sequence[int]) -> list[SequenceCache]:
        caches = [self.seqs[s] for s in seq_ids]
        for c, n in zip(caches, lens):
            c.check_room(n)
        # keyed by the cache object (the public sublayers see caches, not sequence ids)
        self.journal = {id(c): c.snapshot(n) for c, n in zip(caches, lens)} if self.journaling else None
        return caches

    def _save_state(self, seq_ids: Sequence[int]) -> dict[int, StepJournal]:
        # an undo point for a chunked step on sequences that hold tokens (EngineCore.step)
        return {s: self.seqs[s].snapshot(0) for s in seq_ids}

    def _restore_state(self, seq_ids: Sequence[int], saved: dict[int, StepJournal]) -> None:
        for s in seq_ids:
            self.seqs[s].restore(saved[s])

    def _commit(self, seq_ids, tokens, caches: list[SequenceCache]) -> None:
        for c, ts in zip(caches, tokens):
            c.length += len(ts)
            c.token_ids.extend(int(t) for t in ts)

    def _forward(self, ids: torch.Tensor, seq_ids, starts, lens, caches: list[SequenceCache]) -> torch.Tensor:
        """Embedding and every decoder layer; returns the HC stream [ΣT, hc_mult, D]."""
        cfg, ops, tm = self.cfg, self.ops, self.timer
        positions = (torch.arange(starts[0], starts[0] + lens[0]) if len(lens) == 1 else
                     torch.cat([torch.arange(s0, s0 + n) for s0, n in zip(starts, lens)]))
        offs = [0]
        for n in lens:
            offs.append(offs[-1] + n)
        pipe = self.pipe
        if pipe is not None and not pipe.is_first:
            with tm("pipeline"):
                # a layer hands the HC streams on in float32 (values rounded to the dtype)
                x_hc = pipe.recv_hidden((int(ids.numel()), cfg.hc_mult, cfg.hidden_size), torch.float32)
        else:
            with tm("embed"):
                x_hc = ops.embed(self.w, cfg, ids, self.dtype)
        for layer in self.layer_ids:
            with tm.layer(layer, cfg.layer_type(layer)):  # a trace scope; no-op unless tracing
                lw = self._layer_views.get(layer)
                if lw is None:  # one view per layer: it keeps the layer's expert list
                    lw = self._layer_views[layer] = _model.LayerWeights(self.w, layer)
                x_hc = self.attention_block(lw, layer, x_hc, positions, caches, offs)
                x_hc = self.ffn_block(lw, layer, x_hc, ids)
        if pipe is not None and not pipe.is_last:
            with tm("pipeline"):
                pipe.send_hidden(x_hc, torch.float32)
        self.last_hidden = x_hc  # the MTP block's input (speculative decoding)
        return x_hc

    def _pre_norm(self, lw, x_hc: torch.Tensor, sub: str, norm: str):
        """The sublayer's ``hc_pre`` + input norm (``sub`` "attn" / "ffn", ``norm`` its norm
        weight's name): the values the previous sublayer computed with its ``hc_post`` when it
        handed on this very ``x_hc``, else one ``hc_pre_norm`` call."""
        h, self._handoff = self._handoff, None
        if h is not None and h[0] is x_hc:
            return h[1:]
        cfg = self.cfg
        with self.timer("hc_pre"):
            return self.ops.hc_pre_norm(x_hc, lw[f"hc_{sub}_fn"], lw[f"hc_{sub}_scale"], lw[f"hc_{sub}_base"], lw[norm],
                                        hc_mult=cfg.hc_mult, sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
                                        rms_eps=cfg.rms_norm_eps, dtype=self.dtype)

    def _post_ffn_pre(self, out: torch.Tensor, x_hc: torch.Tensor, post, comb, lw) -> torch.Tensor:
        """The attention sublayer's ``hc_post`` and the FFN sublayer's hc_pre + ffn_norm (layer
        weights ``lw``) in one call (timed as ``hc_post``); the latter handed on to
        :meth:`_pre_norm`. Returns the new HC streams."""
        cfg = self.cfg
        with self.timer("hc_post"):
            h = self.ops.hc_post_pre_norm(out, x_hc, post, comb, lw["hc_ffn_fn"], lw["hc_ffn_scale"], lw["hc_ffn_base"],
                                          lw["ffn_norm.weight"], hc_mult=cfg.hc_mult,
                                          sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
                                          rms_eps=cfg.rms_norm_eps, dtype=self.dtype)
        self._handoff = h
        return h[0]

    # ------------------------------------------------------------------ speculative decoding
    @property
    def has_mtp(self) -> bool:
        """True when the weights include MTP block 0 (loaded with ``mtp=True``) and this
        engine runs every layer (not one pipeline stage)."""
        return self.cfg.num_nextn_predict_layers > 0 and len(self.layer_ids) == self.cfg.num_hidden_layers

    def rewind(self, seq_id: int, keep: int) -> None:
        """Drop all but the first ``keep`` tokens of sequence ``seq_id``'s last step: the
        caches of every decoder layer (window rows, compressor and indexer state, compressed
        entries) become what a step of those ``keep`` tokens would have left. Needs
        ``journaling`` on during that step. Raises KeyError for an unknown id, RuntimeError
        when the last step was not journaled (or was already rewound), ValueError unless
        ``0 <= keep <=`` the step's length."""
        c = self.seqs.get(seq_id)
        if c is None:
            raise KeyError(f"unknown sequence id {seq_id!r}")
        jr = (self.journal or {}).get(id(c))
        if jr is None:
            raise RuntimeError(f"sequence {seq_id}: its last step was not journaled (set engine.journaling = True "
                               "before the step) or was already rewound")
        c.rewind(jr, keep, self.cfg.num_hidden_layers)
        del self.journal[id(c)]

    def mtp_length(self, seq_id: int) -> int:
        """Positions MTP block 0 has consumed for sequence ``seq_id`` (its rows 0 … n-1)."""
        return self.seqs[seq_id].layers[self.cfg.mtp_layer(0)].window.end

    def draft(self, seq_ids: Sequence[int], hidden: Sequence[torch.Tensor],
              next_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Run MTP block 0 (spec §12.1, :mod:`llm_kernels.reference.deepseek_v4.mtp`) over
        the next rows of each sequence and return the draft logits of each sequence's last
        row, float32 [1, V] (the prediction of the token after ``next_ids[b][-1]``).

        Args:
            hidden: per sequence, the main model's final HC streams [n_b, HC, D] at the
                positions ``mtp_length(seq) … + n_b - 1`` (rows of ``last_hidden``).
            next_ids: per sequence, the n_b tokens that follow those positions.
        Raises RuntimeError without MTP weights; ValueError for mismatched rows, an MTP row
        past the decoder's positions or an out-of-vocabulary id; KeyError for an unknown id."""
        cfg, ops, dt, tm = self.cfg, self.ops, self.dtype, self.timer
        if not self.has_mtp:
            raise RuntimeError("the model was loaded without its MTP block: load the checkpoint with mtp=True "
                               "(generate --speculative mtp)")
        if not (len(seq_ids) == len(hidden) == len(next_ids)) or not seq_ids:
            raise ValueError(f"draft needs one hidden block and one id list per sequence, got {len(seq_ids)} "
                             f"sequences, {len(hidden)} hidden blocks, {len(next_ids)} id lists")
        L = cfg.mtp_layer(0)
        caches = [self.seqs[s] for s in seq_ids]
        starts, lens = [], []
        for s, c, h, nx in zip(seq_ids, caches, hidden, next_ids):
            n, start = h.shape[0], c.layers[L].window.end
            if n == 0 or len(nx) != n or tuple(h.shape[1:]) != (cfg.hc_mult, cfg.hidden_size):
                raise ValueError(f"sequence {s}: hidden must be [n >= 1, {cfg.hc_mult}, {cfg.hidden_size}] with n "
                                 f"next ids, got {tuple(h.shape)} and {len(nx)} ids")
            if start + n > c.length:
                raise ValueError(f"sequence {s}: MTP rows {start} … {start + n - 1} need the decoder's hidden "
                                 f"states, which exist for positions < {c.length}")
            starts.append(start)
            lens.append(n)
        ids = torch.tensor([int(t) for nx in next_ids for t in nx], dtype=torch.long)
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
            raise ValueError(f"next_ids must lie in [0, {cfg.vocab_size}), got min {int(ids.min())} "
                             f"max {int(ids.max())}")
        positions = torch.cat([torch.arange(s0, s0 + n) for s0, n in zip(starts, lens)])
        offs = [0]
        for n in lens:
            offs.append(offs[-1] + n)
        mw = self._layer_views.get(L)
        if mw is None:
            mw = self._layer_views[L] = _model.LayerWeights(self.w, L, prefix="mtp.0.")
        x = torch.cat(list(hidden), dim=0)
        T, HC, D = x.shape
        saved, self.journal = self.journal, None  # MTP rows are committed rows: nothing to rewind
        try:
            with tm.layer(L, "mtp"):
                with tm("mtp_proj"):
                    e = ops.embed(self.w, cfg, ids, dt)[:, 0]
                    e = ops.rms_norm(e, mw["enorm.weight"], cfg.rms_norm_eps, dt)
                    h = ops.rms_norm(x.reshape(T * HC, D), mw["hnorm.weight"], cfg.rms_norm_eps, dt)
                    pe = ops.linear(e, mw["e_proj.weight"], dt)
                    ph = ops.linear(h, mw["h_proj.weight"], dt).view(T, HC, D)
                    x = rnd(pe.unsqueeze(1) + ph, dt)
                x = self.attention_block(mw, L, x, positions, caches, offs)
                x = self.ffn_block(mw, L, x, ids)
        finally:
            self.journal = saved
        with tm("lm_head"):
            logits = self._lm_head(x[torch.tensor(offs[1:]) - 1], prefix="mtp.0.")
        return [logits[b:b + 1] for b in range(len(seq_ids))]

    def _lm_head(self, x_hc: torch.Tensor, prefix: str = "") -> torch.Tensor:
        """``hc_head`` -> final norm -> the shared head; ``prefix`` ``"mtp.0."``: the MTP
        block's own ``hc_head_*`` and norm (spec §12.1)."""
        cfg, ops, dt, w = self.cfg, self.ops, self.dtype, self.w
        y = ops.hc_head(x_hc, w[prefix + "hc_head_fn"], w[prefix + "hc_head_scale"], w[prefix + "hc_head_base"],
                        hc_eps=cfg.hc_eps, rms_eps=cfg.rms_norm_eps, dtype=dt)
        y = ops.rms_norm(y, w[prefix + "norm.weight"], cfg.rms_norm_eps, dt)
        return ops.linear(y, w["head.weight"], dt)

    # ------------------------------------------------------------------ sublayers
    def attention_block(self, lw, layer: int, x_hc: torch.Tensor, positions: torch.Tensor,
                        caches: list[SequenceCache], offs: list[int]) -> torch.Tensor:
        """hc_pre -> qkv_proj_rope -> (compressor, indexer) per sequence -> one ragged
        sparse attention call for all sequences -> grouped output projection -> hc_post for
        layer ``layer``. ``x_hc`` [ΣT, hc, D];
        ``offs`` the row offsets of each sequence (len(caches) + 1); the caches are advanced
        (window rows, compressor state). Returns the new HC stream [ΣT, hc, D]."""
        cfg, dt, ops, tm = self.cfg, self.dtype, self.ops, self.timer
        lt = cfg.layer_type(layer)
        journal = self.journal  # None unless journaling
        xn, post, comb = self._pre_norm(lw, x_hc, "attn", "attn_norm.weight")  # hc_pre and attn_norm
        with tm("qkv_proj_rope"):
            cos, sin = self.rope(cfg.rope_for_layer(layer), cfg.qk_rope_head_dim, positions)
            q, kv, q_res = ops.qkv_proj_rope(xn, lw["attn.wq_a.weight"], lw["attn.q_norm.weight"],
                                             lw["attn.wq_b.weight"], lw["attn.wkv.weight"],
                                             lw["attn.norm.weight"], cos, sin,
                                             num_heads=cfg.num_attention_heads, head_dim=cfg.head_dim,
                                             eps=cfg.rms_norm_eps, dtype=dt)
        W = cfg.sliding_window
        # Row-wise projections of the compressors and the indexer query run once for all
        # sequences' rows (each weight streams once per step, not once per sequence); the
        # per-sequence loop below slices them. With INT8 weights every row is exact on its
        # own (per-token quantisation, INT32 GEMM), so a row's values do not depend on the
        # other sequences; float weights share one GEMM for all rows, like wq_a / wkv above.
        cmp_rows = idx_rows = idx_q = None
        if lt != SLIDING:
            with tm("compressor"):
                cmp_rows = self._project(lw, "attn.compressor.", xn, positions)
            if lt != HCA:
                with tm("indexer"):
                    idx_rows = self._project(lw, "attn.indexer.compressor.", xn, positions)
                    icos, isin = self.rope(cfg.rope_compress, cfg.qk_rope_head_dim, positions)
                    wq_b = lw["attn.indexer.wq_b.weight"]
                    args = (q_res, xn, wq_b, lw["attn.indexer.weights_proj.weight"], icos, isin)
                    kw = dict(n_heads=cfg.index_n_heads, head_dim=cfg.index_head_dim, dtype=dt)
                    idx_int8 = isinstance(wq_b, (QuantWeight, GroupQuantWeight))  # INT8 keys cached, INT8 scores
                    idx_q = ops.indexer_query_int8(*args, **kw) if idx_int8 else ops.indexer_query(*args, **kw)
        # Each sequence's KV pool (window rows, this step's rows, compressed entries) and the
        # rows of it each of its queries attends; one ragged attention call for all sequences.
        pos_np = positions.numpy()
        pools, idxs = [], []
        with tm("kv_cache"):  # window rows of every query (one numpy pass for all sequences)
            starts = [c.layers[layer].window.start for c in caches]
            win_idx = _window_rows(pos_np, W, starts[0] if len(caches) == 1 else
                                   np.repeat(np.array(starts), np.diff(offs))[:, None])
        for b, c in enumerate(caches):
            sl = slice(offs[b], offs[b + 1])
            lc = c.layers[layer]
            pos = positions[sl] if len(caches) > 1 else positions
            win = lc.window
            jr = journal.get(id(c)) if journal is not None else None
            with tm("kv_cache"):  # window rows of query p: positions p-W+1 … p, at pool row (position - win.start)
                pieces = [win.rows, kv[sl] if len(caches) > 1 else kv]
                idx = win_idx[sl]
            if lt != SLIDING:
                ratio = cfg.compress_ratio(layer)
                with tm("compressor"):
                    self._compress(lc.compressor, lw, "attn.compressor.", [r[sl] for r in cmp_rows], pos, jr,
                                   (layer, "compressor"))
                with tm("kv_cache"):
                    entries = lc.compressor.valid_entries()
                    base = win.rows.shape[0] + (sl.stop - sl.start)
                    pieces.append(entries)
                    n = entries.shape[0]
                if lt == HCA:
                    with tm("kv_cache"):
                        cidx = np.arange(n)
                        comp = np.where(cidx[None, :] < ((pos_np[sl] + 1) // ratio)[:, None], cidx + base, -1)
                else:
                    with tm("indexer"):
                        new = self._compress(lc.indexer, lw, "attn.indexer.compressor.", [r[sl] for r in idx_rows], pos,
                                             jr, (layer, "indexer"))
                        if idx_int8:
                            if new is not None:
                                lc.indexer.store_int8_keys(*ops.indexer_keys_int8(new))
                            qi8, qs, wi = (r[sl] for r in idx_q)
                            scores = ops.indexer_scores_int8(qi8, qs, wi, *lc.indexer.valid_int8_keys())
                        else:
                            qi, wi = (r[sl] for r in idx_q)
                            scores = ops.indexer_scores(qi, wi, lc.indexer.valid_entries())
                        top = ops.indexer_topk(scores, pos, ratio, cfg.index_topk).to(torch.int64).numpy()
                    with tm("kv_cache"):
                        comp = np.where(top >= 0, top + base, top)
                with tm("kv_cache"):
                    idx = np.concatenate([idx, comp], axis=1)
            pools.append(pieces)
            idxs.append(torch.from_numpy(idx))
        with tm("sparse_attn"):
            o = ops.sparse_attn_core_ragged(q, pools, idxs, lw["attn.attn_sink"], cos, sin,
                                            softmax_scale=cfg.softmax_scale, dtype=dt)
        with tm("kv_cache"):
            for b, c in enumerate(caches):
                sl = slice(offs[b], offs[b + 1])
                c.layers[layer].window.append(kv[sl])
                jr = journal.get(id(c)) if journal is not None else None
                if jr is not None:
                    jr.rows[(layer, "window")] = kv[sl]
        with tm("sparse_attn"):  # the output projection streams wo_a/wo_b once for all sequences
            out = ops.grouped_output_proj(o, lw["attn.wo_a.weight"], lw["attn.wo_b.weight"],
                                          o_groups=cfg.o_groups, dtype=dt)
        # hc_post, and the FFN sublayer's hc_pre + ffn_norm in the same call (handed on)
        return self._post_ffn_pre(out, x_hc, post, comb, lw)

    def _project(self, lw, prefix: str, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The compressor ``prefix``'s projections of rows ``x`` [T, D] at positions ``pos``:
        (kv [T, d], score [T, d] with ``ape`` added)."""
        return self.ops.compressor_project(x, lw[prefix + "wkv.weight"], lw[prefix + "wgate.weight"],
                                           lw[prefix + "ape"], pos, self.dtype)

    def _compress(self, st: CompressorState, lw, prefix: str, rows: list[torch.Tensor], pos: torch.Tensor,
                  jr: StepJournal | None = None, key=None) -> torch.Tensor | None:
        """Absorb this sequence's rows ``rows = [kv, score]`` of compressor ``prefix``
        (:meth:`_project`, positions ``pos``), close every complete window, append its
        entries; returns the new entries [m, d] (None if no window closed). ``jr``: the
        step's journal, which records the projected rows under ``key``."""
        cfg, dt, ops = self.cfg, self.dtype, self.ops
        expected = st.next_window_start + st.buf_kv.shape[0]
        if int(pos[0]) != expected:
            raise RuntimeError(f"compressor state expects position {expected}, got {int(pos[0])}")
        kv, score = rows
        if jr is not None:
            jr.rows[key] = (kv, score)
        n0 = st.n_entries
        kvw, sw, prev_kv, prev_score, n = st.absorb(kv, score)
        if not n:
            return None
        wpos = (n0 + torch.arange(n)) * st.ratio
        cos, sin = self.rope(cfg.rope_compress, cfg.qk_rope_head_dim, wpos)
        new = ops.compress_windows(kvw, sw, prev_kv, prev_score, lw[prefix + "norm.weight"], cos, sin,
                                   overlap=st.overlap, eps=cfg.rms_norm_eps, dtype=dt)
        st.push_entries(new)
        return new

    def ffn_block(self, lw, layer: int, x_hc: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """hc_pre -> gate -> moe (routed + shared experts) -> hc_post for layer ``layer``.
        ``ids`` [ΣT] token ids (hash routing). Returns the new HC stream [ΣT, hc, D]. (Called
        with the output of this layer's :meth:`attention_block`, its hc_pre + ffn_norm were
        computed there.)"""
        cfg, dt, ops, tm = self.cfg, self.dtype, self.ops, self.timer
        xn, post, comb = self._pre_norm(lw, x_hc, "ffn", "ffn_norm.weight")  # hc_pre and ffn_norm
        hash_layer = cfg.is_hash_layer(layer)
        with tm("gate"):
            w, idx = ops.gate(xn, lw["ffn.gate.weight"], None if hash_layer else lw["ffn.gate.bias"],
                              lw["ffn.gate.tid2eid"] if hash_layer else None, ids,
                              top_k=cfg.num_experts_per_tok, scoring_func=cfg.scoring_func,
                              norm_topk_prob=cfg.norm_topk_prob,
                              routed_scaling_factor=cfg.routed_scaling_factor, dtype=dt)
        with tm("moe"):
            shared = (lw["ffn.shared_experts.w1.weight"], lw["ffn.shared_experts.w3.weight"],
                      lw["ffn.shared_experts.w2.weight"])
            y = ops.moe(xn, w, idx, lw.experts(cfg.n_routed_experts), shared, swiglu_limit=cfg.swiglu_limit,
                        dtype=dt)
        with tm("hc_post"):  # (the next layer's hc_pre stays in its own layer's trace scope)
            return ops.hc_post(y, x_hc, post, comb, dt)
