"""Explicit per-sequence, per-layer decode state of DeepSeek-V4.

* ``WindowKV``: the last ``sliding_window - 1`` raw KV rows (all layers). Older rows are
  never read again (the window of a query at p is p-W+1 … p, and p's own row is new).
* ``CompressorState``: the partial window of per-token ``(kv, score)`` rows not yet
  compressed, the front halves of the last complete window (ratio-4 overlap), and the
  compressed entries emitted so far (capacity ``max_seq_len // ratio``). Used for the
  main CSA/HCA compressor and for the indexer's compressor (whose entries are the
  indexer keys).

Nothing is silently dropped: appending past a capacity raises :class:`CacheOverflowError`.

Speculative decoding rewinds a step: :meth:`SequenceCache.snapshot` keeps, per layer, the
state before a step (references: every update replaces tensors or writes past the valid
rows, never in place over them), and :meth:`SequenceCache.rewind` goes back to it and
re-absorbs the rows of the step's kept prefix (recorded in a :class:`StepJournal`). The
compressed entries of windows closed by kept rows are the ones the step computed, still in
place. MTP blocks (layer ids ``num_hidden_layers + k``) get a sliding-window cache like an
SWA layer.

Spec: ``shared/design/deepseek_v4_architecture.md`` §7.2-§7.3, §11.1, §11.3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...errors import CacheOverflowError
from ...models.deepseek_v4.config import CSA, SLIDING, DeepSeekV4Config

__all__ = ["CacheOverflowError", "WindowKV", "CompressorState", "LayerCache", "SequenceCache", "StepJournal"]


def _f32(t: torch.Tensor) -> np.ndarray:
    """float32 numpy view (or copy) of rows ``t``."""
    return t.numpy() if t.dtype == torch.float32 and not t.requires_grad else t.detach().float().numpy()


class WindowKV:
    """Rolling raw-KV rows [n <= size, HD] (float32 holding storage-dtype values) of the
    positions ``end - n … end - 1``.

    ``rows`` is a view into a buffer of ``2 · size`` rows: an append writes the new rows
    just past the valid ones and moves the view (no copy of the window per step); when
    the buffer's end is reached the kept rows move to a new buffer (once every ~``size``
    rows). Rows a view covers are never written again, so every :meth:`snapshot` stays
    valid while later steps append (the rewind of speculative decoding); after a
    :meth:`restore` or an assignment of ``rows`` (the layer benchmark loads a window so)
    the next append starts a new buffer."""

    def __init__(self, size: int, head_dim: int, rows: torch.Tensor | None = None, end: int = 0) -> None:
        self.size, self.head_dim, self.end = int(size), int(head_dim), int(end)
        self.rows = torch.zeros(0, self.head_dim) if rows is None else rows

    @property
    def rows(self) -> torch.Tensor:
        """The window's rows [n, HD] float32, oldest first."""
        return self._rows

    @rows.setter
    def rows(self, value: torch.Tensor) -> None:
        self._rows, self._buf, self._at = value, None, 0  # _buf [cap, HD] numpy; rows = _buf[_at:_at + n]

    @property
    def start(self) -> int:
        """Position of ``rows[0]``."""
        return self.end - self._rows.shape[0]

    def append(self, kv: torch.Tensor) -> None:
        """Add rows [n, HD] for positions ``end … end+n-1``, keep the newest ``size``."""
        if kv.dim() != 2 or kv.shape[-1] != self.head_dim:
            raise ValueError(f"window KV rows must have {self.head_dim} lanes, got {tuple(kv.shape)}")
        n, have = kv.shape[0], self._rows.shape[0]
        a = _f32(kv)
        new = a[n - self.size:] if n > self.size else a  # the rows that can stay
        keep = min(have, self.size - new.shape[0])  # old rows that stay
        buf, at = self._buf, self._at
        if buf is None or at + have + new.shape[0] > buf.shape[0]:
            nb = np.empty((max(2 * self.size, keep + new.shape[0]), self.head_dim), np.float32)
            nb[:keep] = self._rows[have - keep:].detach().float().numpy()
            buf, at, have = nb, 0, keep
        buf[at + have:at + have + new.shape[0]] = new
        at += have - keep
        self._buf, self._at = buf, at
        self._rows = torch.from_numpy(buf[at:at + keep + new.shape[0]])
        self.end += n

    def snapshot(self) -> tuple:
        return self._rows, self.end

    def restore(self, snap: tuple) -> None:
        # a restored view may end before rows other snapshots cover: the next append starts
        # a new buffer (assigning rows does), so no snapshot's rows are ever written over
        self.rows, self.end = snap


@dataclass
class CompressorState:
    """State of one compressor (ratio ``ratio``, entry width ``head_dim``, overlap iff CSA).

    ``buf_kv``/``buf_score`` [n < ratio, coff·d] hold the rows of the open window;
    ``prev_kv``/``prev_score`` [ratio, d] the front halves of the last closed window
    (overlap only); ``entries`` [capacity, d] the compressed entries, ``n_entries`` used.
    """

    ratio: int
    head_dim: int
    overlap: bool
    capacity: int
    buf_kv: torch.Tensor = None  # type: ignore[assignment]
    buf_score: torch.Tensor = None  # type: ignore[assignment]
    prev_kv: torch.Tensor | None = None
    prev_score: torch.Tensor | None = None
    entries: torch.Tensor = None  # type: ignore[assignment]
    n_entries: int = 0
    keys_i8: torch.Tensor | None = None      # W8A8 indexer: INT8 keys [capacity, d]
    keys_scale: torch.Tensor | None = None   # and their dequant scales [capacity, 1]
    # (buf_kv, buf_score, their numpy backing [ratio, coff·d] each) while the open window's
    # rows are views of those buffers: a row that closes no window is written past them
    _open: tuple | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        w = (2 if self.overlap else 1) * self.head_dim
        if self.buf_kv is None:
            self.buf_kv = torch.zeros(0, w)
            self.buf_score = torch.zeros(0, w)
        if self.entries is None:
            self.entries = torch.zeros(self.capacity, self.head_dim)

    @property
    def next_window_start(self) -> int:
        """Absolute position of the first token of the open window."""
        return self.n_entries * self.ratio

    def valid_entries(self) -> torch.Tensor:
        """[n_entries, d] view of the emitted entries."""
        return self.entries[: self.n_entries]

    def absorb(self, kv: torch.Tensor, score: torch.Tensor):
        """Append projected rows kv/score [n, coff·d] to the open window and close every
        complete window: returns ``(kvw, sw, prev_kv, prev_score, m)``, the ``m`` closed
        windows [m, ratio, coff·d] and (overlap) the front halves of the window before each
        [m, ratio, d] (None without overlap), ready for ``compress_windows``. The caller
        pushes their entries (:meth:`push_entries`) or, when rewinding, reclaims them
        (:meth:`reclaim`). ``buf``/``prev`` are updated here.

        Rows that close no window (a decode step's) are written into the open window's
        buffer just past its valid rows and ``buf`` becomes the longer view: no earlier view
        (a :meth:`snapshot`'s) is written over, as with :class:`WindowKV`."""
        n, k, o, r = self.buf_kv.shape[0], kv.shape[0], self._open, self.ratio
        if n + k <= r and o is not None and o[0] is self.buf_kv and o[1] is self.buf_score:
            bk, bs = o[2], o[3]
            bk[n:n + k] = _f32(kv)
            bs[n:n + k] = _f32(score)
            if n + k < r:
                self.buf_kv, self.buf_score = torch.from_numpy(bk[:n + k]), torch.from_numpy(bs[:n + k])
                self._open = (self.buf_kv, self.buf_score, bk, bs)
                return None, None, None, None, 0
            # the rows close exactly one window: it is the buffer (never written again: the
            # next rows go to a new one), the general path's values without its copies
            kvw, sw = torch.from_numpy(bk[None]), torch.from_numpy(bs[None])
            prev_kv = prev_score = None
            if self.overlap:
                d = self.head_dim
                first_kv, first_sc = self._first_halves()
                prev_kv, prev_score = first_kv[None], first_sc[None]
                self.prev_kv, self.prev_score = torch.from_numpy(bk[:, :d].copy()), torch.from_numpy(bs[:, :d].copy())
            bk, bs = np.empty_like(bk), np.empty_like(bs)
            self.buf_kv, self.buf_score = torch.from_numpy(bk[:0]), torch.from_numpy(bs[:0])
            self._open = (self.buf_kv, self.buf_score, bk, bs)
            return kvw, sw, prev_kv, prev_score, 1
        all_kv = torch.cat([self.buf_kv, kv], dim=0)
        all_score = torch.cat([self.buf_score, score], dim=0)
        r, d = self.ratio, self.head_dim
        m = all_kv.shape[0] // r
        kvw = sw = prev_kv = prev_score = None
        if m:
            kvw = all_kv[: m * r].view(m, r, all_kv.shape[-1])
            sw = all_score[: m * r].view(m, r, all_score.shape[-1])
            if self.overlap:
                first_kv, first_sc = self._first_halves()
                prev_kv = torch.cat([first_kv[None], kvw[:-1, :, :d]], dim=0)
                prev_score = torch.cat([first_sc[None], sw[:-1, :, :d]], dim=0)
                self.prev_kv, self.prev_score = kvw[-1, :, :d].clone(), sw[-1, :, :d].clone()
        # the open rows alone, in new buffers (not views keeping the closed windows alive)
        left = all_kv.shape[0] - m * r
        bk = np.empty((r, all_kv.shape[-1]), np.float32)
        bs = np.empty((r, all_score.shape[-1]), np.float32)
        bk[:left] = _f32(all_kv[m * r:])
        bs[:left] = _f32(all_score[m * r:])
        self.buf_kv, self.buf_score = torch.from_numpy(bk[:left]), torch.from_numpy(bs[:left])
        self._open = (self.buf_kv, self.buf_score, bk, bs)
        return kvw, sw, prev_kv, prev_score, m

    def _first_halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The front halves before the next closed window: the last closed window's, or
        (none closed yet) zeros and ``-inf`` scores."""
        r, d = self.ratio, self.head_dim
        return (self.prev_kv if self.prev_kv is not None else torch.zeros(r, d),
                self.prev_score if self.prev_score is not None else torch.full((r, d), float("-inf")))

    def reclaim(self, m: int) -> None:
        """Count ``m`` more entries as valid whose values are already in place (a rewind
        re-absorbing rows whose windows the rewound step closed and compressed)."""
        if self.n_entries + m > self.capacity:
            raise CacheOverflowError(f"compressor (ratio {self.ratio}) cannot reclaim {m} entries past "
                                     f"{self.n_entries} of {self.capacity}")
        self.n_entries += m

    def snapshot(self) -> tuple:
        return self.buf_kv, self.buf_score, self.prev_kv, self.prev_score, self.n_entries

    def restore(self, snap: tuple) -> None:
        self.buf_kv, self.buf_score, self.prev_kv, self.prev_score, self.n_entries = snap

    def push_entries(self, new: torch.Tensor) -> None:
        """Append compressed entries [m, d]; raises CacheOverflowError past capacity."""
        m = new.shape[0]
        if self.n_entries + m > self.capacity:
            raise CacheOverflowError(
                f"compressor (ratio {self.ratio}) would hold {self.n_entries + m} entries, capacity "
                f"is {self.capacity} (max_seq_len // ratio)")
        self.entries[self.n_entries: self.n_entries + m] = new
        self.n_entries += m

    def store_int8_keys(self, k_i8: torch.Tensor, k_scale: torch.Tensor) -> None:
        """Store INT8 keys [m, d] + scales [m, 1] of the ``m`` entries pushed last (W8A8
        indexer key cache)."""
        if self.keys_i8 is None:
            self.keys_i8 = torch.zeros(self.capacity, self.head_dim, dtype=torch.int8)
            self.keys_scale = torch.zeros(self.capacity, 1)
        m = k_i8.shape[0]
        self.keys_i8[self.n_entries - m: self.n_entries] = k_i8
        self.keys_scale[self.n_entries - m: self.n_entries] = k_scale

    def valid_int8_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([n_entries, d] int8, [n_entries, 1] float32) views of the INT8 keys."""
        if self.keys_i8 is None:
            return torch.zeros(0, self.head_dim, dtype=torch.int8), torch.zeros(0, 1)
        return self.keys_i8[: self.n_entries], self.keys_scale[: self.n_entries]


@dataclass
class LayerCache:
    """All state of one layer for one sequence."""

    window: WindowKV
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None


@dataclass
class StepJournal:
    """What one step did to one sequence, for :meth:`SequenceCache.rewind`: ``n`` rows,
    the cache state before it (``snaps``: per layer), and the rows it appended (``rows``:
    ``(layer, part) -> tensors``, part ``"window"`` -> kv [n, HD], ``"compressor"`` /
    ``"indexer"`` -> (kv, score) [n, coff·d])."""

    n: int
    length: int
    snaps: list
    rows: dict = field(default_factory=dict)


@dataclass
class SequenceCache:
    """Per-layer caches of one sequence (decoder layers, then the MTP blocks);
    ``length`` = tokens consumed so far by the decoder layers."""

    layers: list[LayerCache]
    max_seq_len: int
    length: int = 0
    token_ids: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, cfg: DeepSeekV4Config, max_seq_len: int) -> "SequenceCache":
        """Empty caches for ``cfg`` sized for ``max_seq_len`` tokens.
        Raises ValueError if max_seq_len exceeds cfg.max_position_embeddings."""
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        if max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        layers = []
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        for i in range(n_layers):
            lt = cfg.layer_type(i)
            lc = LayerCache(WindowKV(cfg.sliding_window - 1, cfg.head_dim))
            if lt != SLIDING:
                r = cfg.compress_ratio(i)
                lc.compressor = CompressorState(r, cfg.head_dim, lt == CSA, max_seq_len // r)
                if lt == CSA:
                    lc.indexer = CompressorState(r, cfg.index_head_dim, True, max_seq_len // r)
            layers.append(lc)
        return cls(layers, max_seq_len)

    def check_room(self, n_new: int) -> None:
        """Raise CacheOverflowError if ``n_new`` more tokens would exceed ``max_seq_len``."""
        if self.length + n_new > self.max_seq_len:
            raise CacheOverflowError(
                f"sequence of {self.length} tokens cannot take {n_new} more: cache capacity is "
                f"max_seq_len={self.max_seq_len}")

    # ------------------------------------------------------------------ speculative steps
    def snapshot(self, n: int) -> StepJournal:
        """The journal of a step of ``n`` rows about to run (state before it)."""
        snaps = []
        for lc in self.layers:
            snaps.append((lc.window.snapshot(),
                          lc.compressor.snapshot() if lc.compressor is not None else None,
                          lc.indexer.snapshot() if lc.indexer is not None else None))
        return StepJournal(n, self.length, snaps)

    def restore(self, journal: StepJournal) -> None:
        """Put every layer (decoder layers and MTP blocks) back to ``journal``'s state, as if
        nothing had run since :meth:`snapshot`: the undo of a failed chunked step. Appends
        replace the window / buffer tensors the snapshot references, and compressed entries
        and INT8 keys past the restored counts are never read."""
        for lc, (ws, cs, xs) in zip(self.layers, journal.snaps):
            lc.window.restore(ws)
            if lc.compressor is not None:
                lc.compressor.restore(cs)
            if lc.indexer is not None:
                lc.indexer.restore(xs)
        self.length = journal.length
        del self.token_ids[journal.length:]

    def rewind(self, journal: StepJournal, keep: int, n_layers: int) -> None:
        """Undo the journaled step but its first ``keep`` rows, in the first ``n_layers``
        layers (the decoder layers): window rows, compressor and indexer states and entries
        as if the step had fed only those rows. Raises ValueError unless
        ``0 <= keep <= journal.n`` or when the step did not record a layer's rows."""
        if not 0 <= keep <= journal.n:
            raise ValueError(f"keep must be in [0, {journal.n}] (the step's rows), got {keep}")
        for li in range(n_layers):
            lc, (ws, cs, xs) = self.layers[li], journal.snaps[li]
            for part, st, snap in (("window", lc.window, ws), ("compressor", lc.compressor, cs),
                                   ("indexer", lc.indexer, xs)):
                if st is None:
                    continue
                if (li, part) not in journal.rows:
                    raise ValueError(f"layer {li}: the step recorded no {part} rows to rewind")
                st.restore(snap)
                rows = journal.rows[(li, part)]
                if part == "window":
                    st.append(rows[:keep])
                else:
                    kv, score = rows
                    st.reclaim(st.absorb(kv[:keep], score[:keep])[-1])
        self.length = journal.length + keep
        del self.token_ids[journal.length + keep:]

