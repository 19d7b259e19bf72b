"""Compare two ``bench_layer`` result JSONs, and plot one (``docs/performance.md``).

    python -m llm_kernels bench --compare A.json B.json
    python -m llm_kernels bench --from-json A.json --plot A.png

:func:`compare_results` pairs the entries of A and B with the same (layer type, T,
variant = ``backend/quant``) and, for the layer total and every stage, reports

* ``median A`` and ``median B`` (ms) and the **ratio of medians B/A** (< 1: B is faster);
* the **min-max of the per-run pair ratios** ``b_i / a_i``: runs are paired by index when
  both files hold the same number of runs (run i of A with run i of B; both were taken in
  execution order), otherwise every run of A is paired with every run of B (all
  ``n_a x n_b`` pairs);
* how many pairs moved the same way as the ratio of medians (``5/5 faster``); a pair
  with ratio exactly 1 counts as neither.

Per-run times of each stage exist only in JSONs written after per-stage ``runs`` were added
to ``bench_layer``; for older files the stage rows show the medians and their ratio only
(pair columns ``-``). The layer total always has its runs.

Two runs in two processes are never interleaved, so their ratio includes machine drift
between them (bandwidth on this VM moves 35-80 GB/s): prefer one process with both variants
(``--backends reference,fused``: timed round-robin by :func:`~llm_kernels.bench.core.interleaved`)
for a small effect, and check ``bandwidth_gbs`` / ``bandwidth_gbs_end`` of both files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from .core import format_table

__all__ = ["CompareError", "load_results", "compare_results", "format_comparison", "plot_results",
           "require_matplotlib", "pair_ratios"]

# keys that must agree for two result files to be comparable
_MUST_MATCH = ("preset", "context", "rows_per_seq")


class CompareError(ValueError):
    """A result file is missing, unreadable or not comparable."""


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a ``bench_layer`` JSON; :class:`CompareError` with a clear message if it is
    missing, not JSON, or not a bench_layer result."""
    p = Path(path)
    if not p.is_file():
        raise CompareError(f"result file not found: {p}")
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompareError(f"{p}: not a readable JSON file ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("results"), list):
        raise CompareError(f"{p}: not a bench_layer result (no 'results' list)")
    return d


def _key(r: dict[str, Any]) -> tuple[str, int, str]:
    return (str(r["layer_type"]), int(r["T"]), f"{r['backend']}/{r['quant']}")


def pair_ratios(a: Sequence[float] | None, b: Sequence[float] | None) -> list[float]:
    """Per-pair ratios ``b/a``: by index if ``len(a) == len(b)``, else all pairs; [] when
    either side has no runs."""
    if not a or not b:
        return []
    if len(a) == len(b):
        pairs = zip(a, b)
    else:
        pairs = ((x, y) for x in a for y in b)
    return [y / x if x > 0 else math.inf for x, y in pairs]


def _row(name: str, sa: dict[str, Any], sb: dict[str, Any]) -> dict[str, Any]:
    ma, mb = sa.get("median_s"), sb.get("median_s")
    ratio = mb / ma if ma and mb is not None else None
    pr = pair_ratios(sa.get("runs"), sb.get("runs"))
    row: dict[str, Any] = {"stage": name, "median_a_ms": None if ma is None else ma * 1e3,
                           "median_b_ms": None if mb is None else mb * 1e3, "ratio": ratio,
                           "pair_min": min(pr) if pr else None, "pair_max": max(pr) if pr else None,
                           "pairs": len(pr), "faster": sum(r < 1 for r in pr), "slower": sum(r > 1 for r in pr),
                           "paired_by": ("index" if pr and len(sa["runs"]) == len(sb["runs"]) else
                                         "all-pairs" if pr else None)}
    if pr:
        if ratio is not None and ratio > 1:
            row["same_way"] = f"{row['slower']}/{len(pr)} slower"
        else:
            row["same_way"] = f"{row['faster']}/{len(pr)} faster"
    else:
        row["same_way"] = "-"
    return row


def compare_results(a: dict[str, Any], b: dict[str, Any], *, variants: Sequence[str] | None = None,
                    check: bool = True) -> dict[str, Any]:
    """Paired comparison of two loaded result dicts. ``variants``: keep only these
    ``backend/quant`` keys. Raises :class:`CompareError` when ``check`` and the preset,
    context or rows-per-seq differ, or when no (layer, T, variant) is in both."""
    if check:
        bad = [f"{k}: A={a.get(k)!r} B={b.get(k)!r}" for k in _MUST_MATCH if a.get(k) != b.get(k)]
        if bad:
            raise CompareError("results are not comparable (" + "; ".join(bad) + ")")
    ia = {_key(r): r for r in a["results"]}
    ib = {_key(r): r for r in b["results"]}
    if variants:
        ia = {k: v for k, v in ia.items() if k[2] in variants}
        ib = {k: v for k, v in ib.items() if k[2] in variants}
    common = [k for k in ia if k in ib]
    if not common:
        raise CompareError("no (layer type, T, backend/quant) appears in both files: A has "
                           f"{sorted(set(k[2] for k in ia))}, B has {sorted(set(k[2] for k in ib))}")
    groups = []
    for k in common:
        ra, rb = ia[k], ib[k]
        rows = [_row("LAYER TOTAL", ra["total"], rb["total"])]
        sa, sb = ra.get("stages", {}), rb.get("stages", {})
        rows += [_row(s, sa[s], sb[s]) for s in sa if s in sb]
        groups.append({"layer_type": k[0], "T": k[1], "variant": k[2], "rows": rows})
    return {"groups": groups, "only_a": sorted(k for k in ia if k not in ib),
            "only_b": sorted(k for k in ib if k not in ia),
            "bandwidth_a": (a.get("bandwidth_gbs"), a.get("bandwidth_gbs_end")),
            "bandwidth_b": (b.get("bandwidth_gbs"), b.get("bandwidth_gbs_end")),
            "repeats": (a.get("repeats"), b.get("repeats"))}


def _bw(pair) -> str:
    s, e = pair
    if s is None:
        return "?"
    return f"{s:.1f}" + (f"->{e:.1f}" if e is not None else "") + " GB/s"


def format_comparison(cmp: dict[str, Any], name_a: str = "A", name_b: str = "B", *,
                      stages: bool = True) -> str:
    """Aligned text table (one block per layer/T/variant)."""
    rows = []
    for g in cmp["groups"]:
        for r in g["rows"] if stages else g["rows"][:1]:
            rng = (f"{r['pair_min']:.3f}-{r['pair_max']:.3f}" if r["pair_min"] is not None else "-")
            rows.append([g["layer_type"], g["T"], g["variant"], r["stage"], r["median_a_ms"], r["median_b_ms"],
                         None if r["ratio"] is None else f"{r['ratio']:.3f}", rng, r["same_way"]])
    out = [f"A = {name_a} (DRAM {_bw(cmp['bandwidth_a'])}, {cmp['repeats'][0]} runs)",
           f"B = {name_b} (DRAM {_bw(cmp['bandwidth_b'])}, {cmp['repeats'][1]} runs)",
           "ratio = median B / median A (< 1: B faster); pair ratios b_i/a_i "
           + ("paired by run index" if cmp["repeats"][0] == cmp["repeats"][1] else "over all pairs (run counts differ)"),
           "",
           format_table(rows, ["layer", "T", "variant", "stage", "A ms", "B ms", "B/A", "pair B/A min-max",
                               "same way"], align="lrllrrrrl")]
    for tag, ks in (("only in A", cmp["only_a"]), ("only in B", cmp["only_b"])):
        if ks:
            out.append(f"{tag}: " + ", ".join(f"{lt} T={T} {v}" for lt, T, v in ks))
    return "\n".join(out)


# ---------------------------------------------------------------------------- plot
def require_matplotlib():
    """Import matplotlib with the headless Agg backend, or raise RuntimeError saying how to
    install it."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib "
                           "(or pip install -e '.[plot]')") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_results(data: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """PNG with one row per layer type: left, per-stage median time (ms, log scale) as
    grouped bars per (T, variant); right, % of roofline per stage. Returns the path."""
    plt = require_matplotlib()
    res = data.get("results") or []
    if not res:
        raise CompareError("nothing to plot: the result has no entries")
    lts = list(dict.fromkeys(r["layer_type"] for r in res))
    series = list(dict.fromkeys((int(r["T"]), f"{r['backend']}/{r['quant']}") for r in res))
    stages = list(dict.fromkeys(s for r in res for s in r.get("stages", {}) if s != "other"))
    stages.append("LAYER TOTAL")
    fig, axes = plt.subplots(len(lts), 2, figsize=(max(12, 1.1 * len(stages) * 2), 4.2 * len(lts)), squeeze=False)
    width = 0.8 / max(len(series), 1)
    cmap = plt.get_cmap("tab10")
    for i, lt in enumerate(lts):
        by = {(int(r["T"]), f"{r['backend']}/{r['quant']}"): r for r in res if r["layer_type"] == lt}
        for j, ser in enumerate(series):
            r = by.get(ser)
            if r is None:
                continue
            ms, pct = [], []
            for s in stages:
                st = r["total"] if s == "LAYER TOTAL" else r.get("stages", {}).get(s, {})
                m = st.get("median_s")
                ms.append(m * 1e3 if m else 0.0)
                p = r.get("roofline_pct") if s == "LAYER TOTAL" else st.get("roofline_pct")
                pct.append(p or 0.0)
            xs = [k + (j - (len(series) - 1) / 2) * width for k in range(len(stages))]
            lab = f"T={ser[0]} {ser[1]}"
            axes[i][0].bar(xs, ms, width, label=lab, color=cmap(j % 10))
            axes[i][1].bar(xs, pct, width, label=lab, color=cmap(j % 10))
        for c, (ylabel, log) in enumerate((("ms (median)", True), ("% of DRAM roofline", False))):
            ax = axes[i][c]
            ax.set_xticks(range(len(stages)))
            ax.set_xticklabels(stages, rotation=40, ha="right", fontsize=9)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{lt}: " + ("per-stage time" if c == 0 else "% of roofline"), fontsize=11)
            ax.grid(axis="y", alpha=0.3)
            if log:
                ax.set_yscale("log")
        axes[i][0].legend(fontsize=8)
    bw = data.get("bandwidth_gbs")
    fig.suptitle(title or (f"{data.get('preset', '?')} decode layer, context {data.get('context', '?')}, "
                           f"median of {data.get('repeats', '?')}"
                           + (f", DRAM {bw:.1f} GB/s (start of run)" if bw else "")), fontsize=13)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
