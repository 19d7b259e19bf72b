"""Comparators and error statistics for golden validation.

Every comparator is a small object with ``__call__(actual, expected) -> CompareResult``.
A comparator never raises on bad data: a non-tensor, a shape mismatch, a dtype-kind
mismatch (bool / integer / floating) or a non-finite value where the golden is finite
all give a failing :class:`CompareResult` with a one-line message.  All arithmetic is
done on CPU in float64 (integers exactly where it matters), so bf16/fp8 actuals can be
compared against fp32 goldens.

Comparators:

* :class:`AllClose` -- elementwise ``|a - e| <= atol + rtol * |e|`` everywhere.
* :class:`RatioAllClose` -- the same per-point test, with an outlier budget and a cap
  on how far an outlier may be.
* :class:`CosineAtLeast` -- cosine similarity of the flattened tensors.
* :class:`TopKTieAware` -- top-k index outputs; accepts legal tie swaps.

:func:`error_report` computes an :class:`ErrorReport` (a measurement, not a gate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

__all__ = [
    "ErrorReport",
    "error_report",
    "CompareResult",
    "Comparator",
    "AllClose",
    "RatioAllClose",
    "CosineAtLeast",
    "TopKTieAware",
]


# --------------------------------------------------------------------------- helpers
def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "int"


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _index_str(flat: int, shape: tuple[int, ...]) -> str:
    if len(shape) == 0:
        return "()"
    idx = np.unravel_index(int(flat), shape)
    return "(" + ", ".join(str(int(i)) for i in idx) + ("," if len(shape) == 1 else "") + ")"


def _precheck(actual: Any, expected: Any) -> Optional[str]:
    """Return a failure message if the pair cannot be compared elementwise, else None."""
    if not isinstance(actual, torch.Tensor):
        return f"actual is {type(actual).__name__}, not a torch.Tensor"
    if not isinstance(expected, torch.Tensor):
        return f"expected is {type(expected).__name__}, not a torch.Tensor"
    if tuple(actual.shape) != tuple(expected.shape):
        return f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}"
    ka, ke = _kind(actual.dtype), _kind(expected.dtype)
    if ka != ke:
        return (f"dtype kind mismatch: actual {actual.dtype} ({ka}) vs "
                f"expected {expected.dtype} ({ke})")
    if ka == "complex":
        return f"complex dtype {actual.dtype} is not supported"
    return None


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().to(torch.float64).reshape(-1)


# --------------------------------------------------------------------------- report
@dataclass(frozen=True)
class ErrorReport:
    """Error statistics of ``actual`` against ``expected`` (all computed in float64).

    Attributes:
        numel: number of elements compared.
        max_abs: ``max |a - e|``.
        max_rel: ``max |a - e| / |e|`` over elements with ``e != 0`` (0.0 if none;
            errors where the golden is exactly zero show up in ``max_abs`` only).
        mean_abs: ``mean |a - e|``.
        rel_l2: ``||a - e||_2 / ||e||_2`` (0.0 if both are zero, inf if only ``e`` is).
        cosine: ``<a, e> / (||a|| ||e||)`` of the flattened tensors (1.0 if both are
            all-zero, 0.0 if exactly one is).
        p50, p90, p99, p999: percentiles 50 / 90 / 99 / 99.9 of ``|a - e|``
            (linear interpolation).
        nonfinite: number of positions where ``a`` or ``e`` is NaN/Inf.  Statistics
            are computed over all elements, so they become NaN/Inf when this is > 0.
    """

    numel: int
    max_abs: float
    max_rel: float
    mean_abs: float
    rel_l2: float
    cosine: float
    p50: float
    p90: float
    p99: float
    p999: float
    nonfinite: int = 0

    def __str__(self) -> str:
        s = (f"max_abs={_fmt(self.max_abs)} max_rel={_fmt(self.max_rel)} "
             f"mean_abs={_fmt(self.mean_abs)} rel_l2={_fmt(self.rel_l2)} "
             f"cos={self.cosine:.8f} p50={_fmt(self.p50)} p90={_fmt(self.p90)} "
             f"p99={_fmt(self.p99)} p99.9={_fmt(self.p999)}")
        if self.nonfinite:
            s += f" nonfinite={self.nonfinite}"
        return s

    def as_dict(self) -> dict[str, float]:
        """The fields as a plain dict."""
        return dict(self.__dict__)


def error_report(actual: torch.Tensor, expected: torch.Tensor) -> ErrorReport:
    """Compute an :class:`ErrorReport` of ``actual`` vs ``expected``.

    Args:
        actual, expected: tensors of identical shape, any real dtype (bool, integer
            or floating; they may differ, e.g. bf16 vs fp32).

    Raises:
        TypeError: an argument is not a tensor, or is complex.
        ValueError: the shapes differ.
    """
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        raise TypeError("error_report needs two torch.Tensors, got "
                        f"{type(actual).__name__} and {type(expected).__name__}")
    if tuple(actual.shape) != tuple(expected.shape):
        raise ValueError(f"error_report: shape mismatch actual {tuple(actual.shape)} vs "
                         f"expected {tuple(expected.shape)}")
    if actual.dtype.is_complex or expected.dtype.is_complex:
        raise TypeError("error_report does not support complex tensors")
    a, e = _f64(actual), _f64(expected)
    n = a.numel()
    if n == 0:
        return ErrorReport(0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0)
    d = a - e
    ad = d.abs()
    nonfinite = int((~torch.isfinite(a) | ~torch.isfinite(e)).sum())
    nz = e != 0
    max_rel = float((ad[nz] / e[nz].abs()).max()) if bool(nz.any()) else 0.0
    if bool(torch.isnan(ad).any()):  # a NaN error where e == 0 must not vanish
        max_rel = math.nan
    ne = float(torch.linalg.vector_norm(e))
    nd = float(torch.linalg.vector_norm(d))
    if ne == 0.0:
        rel_l2 = 0.0 if nd == 0.0 else math.inf
    else:
        rel_l2 = nd / ne
    na = float(torch.linalg.vector_norm(a))
    if na == 0.0 and ne == 0.0:
        cosine = 1.0
    elif na == 0.0 or ne == 0.0:
        cosine = 0.0
    else:
        cosine = float(torch.dot(a, e)) / (na * ne)
        if math.isfinite(cosine):
            cosine = min(1.0, max(-1.0, cosine))
    p50, p90, p99, p999 = (float(x) for x in np.percentile(ad.numpy(), [50, 90, 99, 99.9]))
    return ErrorReport(
        numel=n,
        max_abs=float(ad.max()),
        max_rel=max_rel,
        mean_abs=float(ad.mean()),
        rel_l2=rel_l2,
        cosine=cosine,
        p50=p50, p90=p90, p99=p99, p999=p999,
        nonfinite=nonfinite,
    )


# --------------------------------------------------------------------------- results
@dataclass
class CompareResult:
    """Outcome of one comparison.

    Attributes:
        passed: whether the output is accepted.
        name: description of the comparator that produced the result.
        message: one-line summary (no newlines).
        report: error statistics, or ``None`` where there is no meaningful numeric
            comparison (non-tensor, shape/kind mismatch, index outputs, missing output).
    """

    passed: bool
    name: str
    message: str
    report: Optional[ErrorReport] = None

    def __bool__(self) -> bool:
        return self.passed


class Comparator:
    """Base class of comparators.

    Subclasses implement ``__call__(actual, expected) -> CompareResult`` and
    ``describe()``.  ``bind(values)`` lets a comparator resolve references to other
    tensors of the case (inputs and golden outputs, by name); the runner calls it
    before comparing and the default returns ``self``.
    """

    def __call__(self, actual: torch.Tensor, expected: torch.Tensor) -> CompareResult:
        raise NotImplementedError

    def describe(self) -> str:
        """One-line description, used as ``CompareResult.name`` and in manifests."""
        return repr(self)

    def bind(self, values: Mapping[str, Any]) -> "Comparator":
        """Return a comparator with named references resolved from ``values``."""
        return self

    def _result(self, passed: bool, message: str,
                report: Optional[ErrorReport] = None) -> CompareResult:
        return CompareResult(bool(passed), self.describe(), " ".join(message.split()), report)


def _check_tol(rtol: float, atol: float) -> None:
    for nm, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"{nm} must be a number >= 0, got {v!r}")


def _close_mask(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float,
                equal_nan: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor]:
    """Return (a64, e64, diff, tol, close) over the flattened tensors."""
    a, e = _f64(actual), _f64(expected)
    tol = atol + rtol * e.abs()
    if _kind(actual.dtype) == "float":
        diff = (a - e).abs()
        same = a == e  # equal infinities are close, like torch.allclose
    else:  # exact integer arithmetic, immune to float64 rounding of large int64
        ai = actual.detach().cpu().reshape(-1).to(torch.int64)
        ei = expected.detach().cpu().reshape(-1).to(torch.int64)
        same = ai == ei
        diff = (ai - ei).abs().to(torch.float64)
    close = same | (diff <= tol)
    if equal_nan:
        close |= torch.isnan(a) & torch.isnan(e)
    return a, e, diff, tol, close


def _worst(a: torch.Tensor, e: torch.Tensor, diff: torch.Tensor, tol: torch.Tensor,
           bad: torch.Tensor, shape: tuple[int, ...]) -> str:
    """Describe the mismatching element with the largest excess over tolerance."""
    excess = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff - tol)
    excess = torch.where(bad, excess, torch.full_like(excess, -math.inf))
    i = int(torch.argmax(excess))
    return (f"worst at {_index_str(i, shape)}: actual={_fmt(float(a[i]))} "
            f"expected={_fmt(float(e[i]))}")


# --------------------------------------------------------------------------- comparators
class AllClose(Comparator):
    """Elementwise closeness like :func:`torch.allclose`.

    Passes iff every element satisfies ``a == e or |a - e| <= atol + rtol * |e|``
    (tolerance relative to the *expected* value).  NaN in ``actual`` fails unless
    ``equal_nan=True`` and ``expected`` is NaN at the same place; equal infinities
    pass.  Integer/bool tensors are compared exactly before applying tolerances.
    The message gives the mismatch count, the worst element (largest excess over
    tolerance) with its index, and the actual/expected values there.

    Args:
        rtol, atol: non-negative tolerances (``AllClose(0, 0)`` is exact equality).
        equal_nan: treat NaN == NaN as a match.

    Raises:
        ValueError: negative or non-numeric tolerances (at construction).
    """

    def __init__(self, rtol: float, atol: float, equal_nan: bool = False) -> None:
        _check_tol(rtol, atol)
        self.rtol, self.atol, self.equal_nan = float(rtol), float(atol), bool(equal_nan)

    def describe(self) -> str:
        extra = ", equal_nan=True" if self.equal_nan else ""
        return f"AllClose(rtol={self.rtol:g}, atol={self.atol:g}{extra})"

    __repr__ = describe

    def __call__(self, actual: torch.Tensor, expected: torch.Tensor) -> CompareResult:
        """Compare; see the class docstring.  Never raises on bad data."""
        err = _precheck(actual, expected)
        if err:
            return self._result(False, err)
        a, e, diff, tol, close = _close_mask(actual, expected, self.rtol, self.atol,
                                             self.equal_nan)
        rep = error_report(actual, expected)
        n, total = int((~close).sum()), close.numel()
        if n == 0:
            return self._result(True, f"allclose ok ({total} elements, rtol={self.rtol:g} "
                                      f"atol={self.atol:g}) max_abs={_fmt(rep.max_abs)} "
                                      f"max_rel={_fmt(rep.max_rel)}", rep)
        worst = _worst(a, e, diff, tol, ~close, tuple(actual.shape))
        return self._result(False, f"{n}/{total} mismatched (rtol={self.rtol:g} "
                                   f"atol={self.atol:g}); {worst}; max_abs={_fmt(rep.max_abs)}",
                            rep)


class RatioAllClose(Comparator):
    """Elementwise tolerance with an outlier budget and a cap on how far an outlier may be.

    A point is an outlier when ``|a - e| > atol + rtol * |e|`` (as in
    :class:`AllClose`).  Passes iff

    * ``outliers / numel <= max_outlier_ratio``,
    * every outlier has ``|a - e| <= max_outlier_error`` (an *absolute* cap, in the units
      of the compared values: a single wildly wrong value fails however small the
      outlier fraction), and
    * no outlier involves a non-finite value (NaN/Inf mismatches always fail, whatever
      the budget).

    The cap is absolute rather than relative to ``|e|`` on purpose: the outliers this
    comparator exists for are values that cancel to ~0 (where any relative measure
    explodes) or INT8 steps (where the natural unit is one step); pick it from the scale
    of the tensor and the mechanism that makes outliers (e.g. "one INT8 step", "one bf16
    ulp at the row scale"), with margin over the worst observed outlier.  ``math.inf``
    disables the cap (say why at the call site).  The message reports the outlier
    fraction, the largest outlier error against the cap and the worst point.

    Args:
        rtol, atol: non-negative tolerances.
        max_outlier_ratio: allowed outlier fraction in ``[0, 1]``.
        max_outlier_error: (keyword, required) the largest ``|a - e|`` an outlier may
            have, ``>= 0`` (``math.inf`` allowed).

    Raises:
        ValueError: negative tolerances or cap, or a ratio outside ``[0, 1]`` (at
            construction).
    """

    def __init__(self, rtol: float, atol: float, max_outlier_ratio: float, *,
                 max_outlier_error: float) -> None:
        _check_tol(rtol, atol)
        if not 0.0 <= max_outlier_ratio <= 1.0:
            raise ValueError(f"max_outlier_ratio must be in [0, 1], got {max_outlier_ratio!r}")
        if (isinstance(max_outlier_error, bool) or not isinstance(max_outlier_error, (int, float))
                or not max_outlier_error >= 0):
            raise ValueError(f"max_outlier_error must be a number >= 0 (math.inf for no cap), "
                             f"got {max_outlier_error!r}")
        self.rtol, self.atol = float(rtol), float(atol)
        self.max_outlier_ratio = float(max_outlier_ratio)
        self.max_outlier_error = float(max_outlier_error)

    def describe(self) -> str:
        return (f"RatioAllClose(rtol={self.rtol:g}, atol={self.atol:g}, "
                f"max_outlier_ratio={self.max_outlier_ratio:g}, "
                f"max_outlier_error={self.max_outlier_error:g})")

    __repr__ = describe

    def __call__(self, actual: torch.Tensor, expected: torch.Tensor) -> CompareResult:
        """Compare; see the class docstring.  Never raises on bad data."""
        err = _precheck(actual, expected)
        if err:
            return self._result(False, err)
        a, e, diff, tol, close = _close_mask(actual, expected, self.rtol, self.atol, False)
        rep = error_report(actual, expected)
        bad = ~close
        n, total = int(bad.sum()), close.numel()
        ratio = n / total if total else 0.0
        n_nonfinite = int((bad & (~torch.isfinite(a) | ~torch.isfinite(e))).sum())
        out_err = float(diff[bad].max()) if n else 0.0  # NaN if a NaN outlier
        far = bad & ~(diff <= self.max_outlier_error)  # NaN diffs count as far
        n_far = int(far.sum())
        passed = ratio <= self.max_outlier_ratio and n_nonfinite == 0 and n_far == 0
        msg = (f"outliers {n}/{total} = {ratio:.4%} "
               f"({'<=' if ratio <= self.max_outlier_ratio else '>'} budget "
               f"{self.max_outlier_ratio:.4%}, rtol={self.rtol:g} atol={self.atol:g})")
        if n:
            msg += (f"; max outlier error {_fmt(out_err)} "
                    f"({'>' if n_far else '<='} cap {_fmt(self.max_outlier_error)})")
        if n_far:
            msg += f"; {n_far} outlier(s) beyond the cap"
        if n_nonfinite:
            msg += f"; {n_nonfinite} non-finite mismatch(es)"
        if n:
            msg += "; " + _worst(a, e, diff, tol, bad, tuple(actual.shape))
        msg += f"; max_abs={_fmt(rep.max_abs)}"
        return self._result(passed, msg, rep)


class CosineAtLeast(Comparator):
    """Cosine similarity gate: passes iff ``cosine(a, e) >= min_cosine``.

    The cosine is computed on the flattened float64 tensors (1.0 when both are
    all-zero, 0.0 when exactly one is); NaN/Inf make it NaN and fail.

    Args:
        min_cosine: lower bound in ``[-1, 1]``.

    Raises:
        ValueError: bound outside ``[-1, 1]`` (at construction).
    """

    def __init__(self, min_cosine: float) -> None:
        if not -1.0 <= min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in [-1, 1], got {min_cosine!r}")
        self.min_cosine = float(min_cosine)

    def describe(self) -> str:
        return f"CosineAtLeast({self.min_cosine:g})"

    __repr__ = describe

    def __call__(self, actual: torch.Tensor, expected: torch.Tensor) -> CompareResult:
        """Compare; see the class docstring.  Never raises on bad data."""
        err = _precheck(actual, expected)
        if err:
            return self._result(False, err)
        rep = error_report(actual, expected)
        cos = rep.cosine
        ok = cos >= self.min_cosine  # False for NaN
        op = ">=" if ok else "<"
        return self._result(ok, f"cosine={cos:.8f} {op} {self.min_cosine:g}; "
                                f"rel_l2={_fmt(rep.rel_l2)} max_abs={_fmt(rep.max_abs)}", rep)


class TopKTieAware(Comparator):
    """Top-k index comparator that accepts legal tie swaps.

    ``actual`` and ``expected`` are integer index tensors ``[..., k]`` into the last
    axis of ``scores`` ``[..., N]`` (same leading dims); ``-1`` marks an invalid /
    padding slot.  Order within a row is ignored.  A row is accepted iff:

    * both rows have only indices in ``[-1, N)`` and no duplicate valid index;
    * both rows select the same number of valid entries;
    * the sorted selected scores agree element by element within ``atol``
      (``a == e`` or ``|a - e| <= atol``; NaN matches NaN).  Equivalently the
      multisets of selected scores match, so any index ``actual`` picks instead of
      an ``expected`` one has the same score: every selected score of one side is
      ``>=`` the other side's minimum selected score (the k-th best) minus ``atol``.

    Identical index sets trivially pass; differing sets that pass are counted as tie
    swaps.  The failure message lists the rows that differ in a non-tie way, with
    the reason for the first one.

    Args:
        scores: the score tensor the indices were selected from, or the *name* of an
            input / golden output of the case holding it (resolved by the runner
            through :meth:`bind`).
        atol: non-negative tolerance on score equality.

    Raises:
        ValueError: negative ``atol``.
        TypeError: ``scores`` neither a tensor nor a str.
    """

    def __init__(self, scores: Union[torch.Tensor, str], atol: float = 0.0) -> None:
        if not isinstance(scores, (torch.Tensor, str)):
            raise TypeError(f"scores must be a tensor or a name, got {type(scores).__name__}")
        _check_tol(0.0, atol)
        self.scores = scores
        self.atol = float(atol)

    def describe(self) -> str:
        s = (repr(self.scores) if isinstance(self.scores, str)
             else f"tensor{tuple(self.scores.shape)}")
        return f"TopKTieAware(scores={s}, atol={self.atol:g})"

    __repr__ = describe

    def bind(self, values: Mapping[str, Any]) -> "TopKTieAware":
        """Resolve a named ``scores`` reference from ``values`` (unchanged if a tensor)."""
        if isinstance(self.scores, str) and self.scores in values:
            bound = TopKTieAware(values[self.scores], self.atol) \
                if isinstance(values[self.scores], torch.Tensor) else self
            return bound
        return self

    def __call__(self, actual: torch.Tensor, expected: torch.Tensor) -> CompareResult:
        """Compare; see the class docstring.  Never raises on bad data."""
        err = _precheck(actual, expected)
        if err:
            return self._result(False, err)
        if isinstance(self.scores, str):
            return self._result(False, f"scores {self.scores!r} not bound to a tensor "
                                       "(no such input/output in the case)")
        if _kind(actual.dtype) != "int":
            return self._result(False, f"index tensors must be integer, got {actual.dtype}")
        if actual.dim() == 0:
            return self._result(False, "index tensors must have at least one dim [..., k]")
        scores = self.scores.detach().cpu()
        if scores.dim() == 0 or tuple(scores.shape[:-1]) != tuple(actual.shape[:-1]):
            return self._result(False, f"scores shape {tuple(scores.shape)} does not match "
                                       f"index shape {tuple(actual.shape)} ([..., N] vs [..., k])")
        if scores.dtype.is_complex:
            return self._result(False, "complex scores are not supported")
        lead = tuple(actual.shape[:-1])
        k, n = actual.shape[-1], scores.shape[-1]
        rows = int(np.prod(lead)) if lead else 1
        S = scores.reshape(rows, n)
        A = actual.detach().cpu().reshape(rows, k).to(torch.int64)
        E = expected.detach().cpu().reshape(rows, k).to(torch.int64)

        def analyse(X: torch.Tensor) -> dict[str, torch.Tensor]:
            valid = (X >= 0) & (X < n)
            oob = (X < -1) | (X >= n)
            filler = -(torch.arange(k, dtype=torch.int64) + 2).expand(rows, k)
            keyed = torch.where(valid, X, filler).sort(dim=-1).values
            dup = (keyed[:, 1:] == keyed[:, :-1]).any(dim=-1) if k > 1 \
                else torch.zeros(rows, dtype=torch.bool)
            if n > 0:
                g = S.gather(-1, X.clamp(0, n - 1)).to(torch.float64)
            else:
                g = torch.zeros(rows, k, dtype=torch.float64)
            g = torch.where(valid, g, torch.full_like(g, math.inf)).sort(dim=-1).values
            idx_set = torch.where(valid, X, torch.full_like(X, -1)).sort(dim=-1).values
            return {"valid": valid, "oob": oob.any(-1), "dup": dup,
                    "count": valid.sum(-1), "scores": g, "set": idx_set}

        ra, re_ = analyse(A), analyse(E)
        ga, ge = ra["scores"], re_["scores"]
        score_eq = (ga == ge) | ((ga - ge).abs() <= self.atol) | (torch.isnan(ga) & torch.isnan(ge))
        score_ok = score_eq.all(-1) if k > 0 else torch.ones(rows, dtype=torch.bool)
        row_ok = (~ra["oob"] & ~re_["oob"] & ~ra["dup"] & ~re_["dup"]
                  & (ra["count"] == re_["count"]) & score_ok)
        exact = (ra["set"] == re_["set"]).all(-1) if k > 0 else torch.ones(rows, dtype=torch.bool)
        n_bad = int((~row_ok).sum())
        n_ties = int((row_ok & ~exact).sum())
        if n_bad == 0:
            return self._result(True, f"all {rows} rows match ({n_ties} with tie swaps, "
                                      f"k={k}, N={n}, atol={self.atol:g})")

        def row_name(r: int) -> str:
            return _index_str(r, lead) if lead else "()"

        bad_rows = torch.nonzero(~row_ok).flatten().tolist()
        r = bad_rows[0]
        if ra["oob"][r]:
            why = f"actual has index outside [-1, {n}): {A[r].tolist()}"
        elif re_["oob"][r]:
            why = f"expected has index outside [-1, {n}): {E[r].tolist()}"
        elif ra["dup"][r]:
            why = f"actual has duplicate indices: {A[r].tolist()}"
        elif re_["dup"][r]:
            why = f"expected has duplicate indices: {E[r].tolist()}"
        elif ra["count"][r] != re_["count"][r]:
            why = f"valid entries {int(ra['count'][r])} vs expected {int(re_['count'][r])}"
        else:
            sa = set(A[r][ra["valid"][r]].tolist())
            se = set(E[r][re_["valid"][r]].tolist())
            only_a, only_e = sorted(sa - se), sorted(se - sa)
            sc = S[r].to(torch.float64)
            why = (f"not a tie: actual-only idx {only_a[:8]} scores "
                   f"{[_fmt(float(sc[i])) for i in only_a[:8]]} vs expected-only idx "
                   f"{only_e[:8]} scores {[_fmt(float(sc[i])) for i in only_e[:8]]}")
        shown = ", ".join(row_name(i) for i in bad_rows[:8])
        more = "" if len(bad_rows) <= 8 else f" (+{len(bad_rows) - 8} more)"
        return self._result(False, f"{n_bad}/{rows} rows differ beyond ties: [{shown}]{more}; "
                                   f"row {row_name(r)}: {why}")
