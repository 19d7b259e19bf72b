"""CPU kernel tiers for the tests: which tier this CPU supports, which one the dispatcher
picked, and skip markers whose reason names the tier a test needs.

Imported as ``kernel_tiers``: ``tests/kernels/conftest.py`` puts ``tests/kernels`` on ``sys.path``
(pytest inserts a rootdir-less conftest's directory), and ``tests/conftest.py`` loads it by path for
the report header.

A *tier* is a kernel family of ``llm_kernels.kernels`` plus the CPU features it needs.
Tiers are ordered, each one needs the features of the tiers below it plus its own:

========================  =======================================  =========================
tier                      /proc/cpuinfo flags                      code it enables
========================  =======================================  =========================
``plain``                 (none)                                   plain auto-vectorised Numba
``avx2``                  ``avx2 fma``                             sign-folded ``vpmaddubsw``
                                                                   INT8 tiles (``jit.INT8_TILE
                                                                   == "avx2"``)
``avx512-vnni``           the above + ``avx512f avx512bw           ``vpdpbusd`` INT8 GEMMs
                          avx512_vnni``                            (``jit.USE_VNNI``)
``avx512-vnni-bf16``      the above + ``avx512_bf16``              + ``vdpbf16ps`` bf16 dots
                                                                   (``USE_BF16_DOT`` /
                                                                   ``USE_BF16_GEMV``)
========================  =======================================  =========================

``LLM_KERNELS_TIER=<tier>`` (read by ``jit`` at import) runs a lower tier than the CPU's
best, e.g. the AVX2 tier on an AVX-512 machine; :func:`expected_tier` is what the dispatcher
must pick for this process's environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import pytest

CPUINFO = "/proc/cpuinfo"


@dataclass(frozen=True)
class Tier:
    name: str
    #: flags as spelled in /proc/cpuinfo (cumulative: includes the lower tiers' flags)
    cpuinfo_flags: tuple[str, ...]
    #: the same features as spelled by llvmlite's ``get_host_cpu_features()``
    llvm_features: tuple[str, ...]
    #: human name of the features, for the header and skip reasons
    features: str


#: lowest to highest
TIERS: tuple[Tier, ...] = (
    Tier("plain", (), (), "no intrinsics"),
    Tier("avx2", ("avx2", "fma"), ("avx2", "fma"), "AVX2, FMA"),
    Tier("avx512-vnni", ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"),
         ("avx2", "fma", "avx512f", "avx512bw", "avx512vnni"), "AVX2, AVX-512F/BW, VNNI"),
    Tier("avx512-vnni-bf16", ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"),
         ("avx2", "fma", "avx512f", "avx512bw", "avx512vnni", "avx512bf16"), "AVX2, AVX-512F/BW, VNNI, BF16"),
)
TIER_NAMES: tuple[str, ...] = tuple(t.name for t in TIERS)
_BY_NAME = {t.name: t for t in TIERS}


def tier(name: str) -> Tier:
    return _BY_NAME[name]


def rank(name: str) -> int:
    """Position of a tier in :data:`TIERS` (higher = faster code paths)."""
    return TIER_NAMES.index(name)


# --------------------------------------------------------------------------- what the CPU has
@lru_cache(maxsize=None)
def cpuinfo() -> dict[str, object] | None:
    """``{"flags": frozenset, "model": str}`` of the first CPU in /proc/cpuinfo, or None
    when the file does not exist (not Linux) or has no ``flags`` line."""
    if not os.path.exists(CPUINFO):
        return None
    flags: frozenset[str] | None = None
    model = "unknown"
    with open(CPUINFO, encoding="utf-8", errors="replace") as f:
        for line in f:
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "flags" and flags is None:
                flags = frozenset(val.split())
            elif key == "model name" and model == "unknown":
                model = val.strip()
            if not line.strip() and flags is not None:
                break  # end of the first processor's block
    return None if flags is None else {"flags": flags, "model": model}


def cpu_model() -> str:
    info = cpuinfo()
    return str(info["model"]) if info else "unknown (no /proc/cpuinfo)"


def best_tier(flags: frozenset[str] | set[str], *, llvm: bool = False) -> str:
    """Highest tier whose features are all in ``flags`` (cpuinfo spelling, or llvmlite's
    with ``llvm=True``)."""
    best = TIERS[0].name
    for t in TIERS:
        if set(t.llvm_features if llvm else t.cpuinfo_flags) <= set(flags):
            best = t.name
    return best


def verdict(expected: str, picked: str) -> str:
    """'' if the dispatcher picked the ``expected`` tier, else why not (a *lower* tier than
    the CPU supports wastes the hardware; a *higher* one would SIGILL or fail in LLVM)."""
    if picked == expected:
        return ""
    if picked not in _BY_NAME:
        return f"picked {picked!r}, which is not a tier (expected {expected})"
    if rank(picked) < rank(expected):
        return f"picked tier {picked}, LOWER than {expected} which this CPU supports"
    return f"picked tier {picked}, HIGHER than {expected} (the CPU lacks {_missing(expected, picked)})"


def _missing(have: str, want: str) -> str:
    miss = [f for f in _BY_NAME[want].cpuinfo_flags if f not in _BY_NAME[have].cpuinfo_flags]
    return " ".join(miss) or "nothing"


# --------------------------------------------------------------------------- what jit picked
def supported_tier() -> str:
    """Highest tier the dispatcher (``jit``'s ``HAS_*`` flags) considers usable on this CPU,
    ignoring ``LLM_KERNELS_FORCE_FALLBACK`` / ``LLM_KERNELS_TIER``."""
    from llm_kernels.kernels.common import jit

    if not jit.HAS_AVX2:
        return "plain"
    if jit.HAS_VNNI and jit.HAS_AVX512BF16:
        return "avx512-vnni-bf16"
    if jit.HAS_VNNI:
        return "avx512-vnni"
    return "avx2"


def expected_tier(cpu_best: str | None = None) -> str:
    """The tier this process must run: ``LLM_KERNELS_TIER`` if set, plain with
    ``LLM_KERNELS_FORCE_FALLBACK``, else the CPU's best (``cpu_best``, default
    :func:`supported_tier`)."""
    from llm_kernels.kernels.common import jit

    best = supported_tier() if cpu_best is None else cpu_best
    req = os.environ.get(jit.TIER_ENV, "").strip().lower()
    if req:
        return req
    return "plain" if jit.FORCE_FALLBACK else best


def active_tier() -> str:
    """Tier of the code this process runs: read from the dispatcher's decisions
    (``dispatch_path()`` and the modules' BF16 switches), not from the CPU flags, so that a
    wrong decision shows up as a mismatch."""
    from llm_kernels.kernels.common import jit
    from llm_kernels.kernels.qwen3 import proj_common as PC
    from llm_kernels.kernels.qwen3 import attention as QA
    from llm_kernels.kernels.deepseek_v4 import output_proj as OP

    bf16 = {bool(QA.USE_BF16_DOT), bool(OP.USE_BF16_DOT), bool(PC.USE_BF16_GEMV)}
    if len(bf16) != 1:
        raise AssertionError(f"the BF16 switches disagree: attention {QA.USE_BF16_DOT}, output_proj "
                             f"{OP.USE_BF16_DOT}, proj_common {PC.USE_BF16_GEMV}")
    use_bf16 = bf16.pop()
    if jit.dispatch_path() == "vnni":
        return "avx512-vnni-bf16" if use_bf16 else "avx512-vnni"
    if use_bf16:
        return "bf16-without-vnni"  # not a tier: the dispatcher tests report it as wrong
    if jit.dispatch_path() == "avx2":
        return "avx2"
    return "plain"


def header_line() -> str:
    """The pytest header line: active tier, its features, forced fallback, the CPU's best
    tier when it differs (forced fallback or ``LLM_KERNELS_TIER``), CPU model."""
    from llm_kernels.kernels.common import jit

    info = jit.dispatch_info()
    name = active_tier()
    feats = _BY_NAME[name].features if name in _BY_NAME else "?"
    forced = "yes" if info["force_fallback"] else "no"
    extra = ""
    if supported_tier() != name:
        extra = f" (CPU supports {supported_tier()})"
    return (f"llm_kernels kernels: tier {name} ({feats}), forced fallback: {forced}{extra}, "
            f"CPU: {cpu_model()}")


# --------------------------------------------------------------------------- skips
def this_cpu() -> str:
    from llm_kernels.kernels.common import jit

    s = f"this CPU: tier {supported_tier()}, {cpu_model()}"
    if jit.FORCE_FALLBACK:
        s += "; LLM_KERNELS_FORCE_FALLBACK set: this process runs tier plain"
    elif jit.TIER != supported_tier():
        s += f"; {jit.TIER_ENV} set: this process runs tier {jit.TIER}"
    return s


def need_reason(name: str, what: str = "") -> str:
    """``"needs AVX-512F/BW, VNNI (tier avx512-vnni) <what>; this CPU: tier plain, <model>"``."""
    w = f" {what}" if what else ""
    return f"needs {_BY_NAME[name].features} (tier {name}){w}; {this_cpu()}"


def needs_cpu(name: str, what: str = "") -> pytest.MarkDecorator:
    """Skip unless the CPU supports tier ``name`` (the test may force that path in-process,
    or in a subprocess, so ``LLM_KERNELS_FORCE_FALLBACK`` / ``LLM_KERNELS_TIER`` do not matter)."""
    return pytest.mark.skipif(rank(supported_tier()) < rank(name), reason=need_reason(name, what))


def needs_active(name: str, what: str = "") -> pytest.MarkDecorator:
    """Skip unless this process runs tier ``name`` or higher (the CPU supports it and the
    fallback is not forced)."""
    ok = active_tier() in _BY_NAME and rank(active_tier()) >= rank(name)
    return pytest.mark.skipif(not ok, reason=need_reason(name, "active, not forced off" + (
        f", {what}" if what else "")))


def skip_unless_active(name: str, what: str = "") -> None:
    """In-test form of :func:`needs_active`."""
    if not (active_tier() in _BY_NAME and rank(active_tier()) >= rank(name)):
        pytest.skip(need_reason(name, "active, not forced off" + (f", {what}" if what else "")))
