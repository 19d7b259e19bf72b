"""Numba infrastructure shared by every kernel: CPU dispatch, cache keying, ``njit_kernel``.

Import this module before anything compiles a kernel (``llm_kernels.kernels.common``
imports it first). On import it:

1. **Keys the Numba cache on all kernel sources.** Numba's on-disk cache (``cache=True``)
   checks only the timestamp/size of the file that holds the jitted function. Editing an
   ``@njit`` helper (or an ``@intrinsic``) in *another* module does not invalidate the
   functions that call it, so a stale machine-code kernel keeps running (reproduced in
   ``shared/design/cpu_kernel_lab.md`` §6: after changing a helper from ``x+1`` to
   ``x+2`` the caller still returned the old result). We therefore point
   ``NUMBA_CACHE_DIR`` at ``~/.cache/llm_kernels/numba/<h>`` where ``h`` is the first 16
   hex digits of the SHA-256 of every ``llm_kernels/kernels/**/*.py`` (relative path +
   contents, sorted by path). Any edit to any kernel source selects a fresh directory, so
   nothing stale can be loaded. The tier (below) is one more level,
   ``.../numba/<h>/<tier>``: Numba keys its cache on the source and the CPU, not on a
   forced tier, and the kernels pick their tile intrinsics through module globals at
   import, so a cache written under one tier must not be loaded under another (nor by a
   child process: the directory this module exports in ``NUMBA_CACHE_DIR`` is marked as
   ours, ``LLM_KERNELS_NUMBA_CACHE_AUTO``, and recomputed there). A user-set
   ``NUMBA_CACHE_DIR`` is respected untouched (then the user owns invalidation, including
   one directory per forced tier). ``$LLM_KERNELS_CACHE`` moves the root like it does for
   the rest of the project (``$LLM_KERNELS_CACHE/numba/<h>/<tier>``).
2. **Pins the threading layer to OpenMP** (``NUMBA_THREADING_LAYER=omp``) unless the user
   chose one: an empty ``prange`` launch costs ~1.4 µs with ``omp`` vs 25-87 µs with
   ``workqueue``, which matters for decode-sized ops (lab notes §6). If the OpenMP layer
   cannot be loaded the choice is left to Numba.
3. **Detects CPU features** with ``llvmlite.binding.get_host_cpu_features()`` and picks
   the **tier**: ``plain`` < ``avx2`` (AVX2+FMA: sign-folded ``vpmaddubsw`` INT8 tiles) <
   ``avx512-vnni`` (``vpdpbusd`` INT8 tiles) < ``avx512-vnni-bf16`` (+ ``vdpbf16ps``
   bf16 dots); default = the best the CPU supports (:data:`CPU_TIER`).
   ``LLM_KERNELS_TIER=<tier>`` (read once, at import) selects a lower one, e.g. to test or
   benchmark the AVX2 code on an AVX-512 machine; a tier the CPU lacks or an unknown name
   raises :class:`TierError` at import — an intrinsic is never compiled for a CPU without
   it (that fails inside LLVM and aborts the process; running it would SIGILL).
   ``LLM_KERNELS_FORCE_FALLBACK=1`` = tier plain (the plain auto-vectorised kernels
   everywhere). :func:`dispatch_tier` / :func:`dispatch_path` / :func:`dispatch_info`
   report the choice; :data:`INT8_TILE` is the one INT8 register tile (and packed weight
   layout) of the process, chosen here once for every INT8 kernel.

Determinism rule for all kernels: every output element is produced by exactly one
``prange`` iteration in a fixed order, and no ``prange`` loop carries a floating-point
reduction, so results are bitwise identical across calls and across thread counts.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import ConfigError

__all__ = [
    "CPU_FEATURES",
    "CPU_TIER",
    "HAS_AVX2",
    "INT8_TILE",
    "TIER",
    "TIERS",
    "TIER_ENV",
    "TierError",
    "USE_BF16",
    "USE_INT8_TILES",
    "select_tier",
    "SERIAL_WORK",
    "serial_twin",
    "sized",
    "cached_kernel_count",
    "dispatch_tier",
    "FORCE_FALLBACK",
    "FORCE_FALLBACK_ENV",
    "HAS_AVX512BF16",
    "HAS_AVX512BW",
    "HAS_AVX512F",
    "HAS_VNNI",
    "USE_VNNI",
    "dispatch_info",
    "dispatch_path",
    "kernel_cache_dir",
    "kernel_source_hash",
    "njit_kernel",
    "prune_stale_caches",
]

FORCE_FALLBACK_ENV = "LLM_KERNELS_FORCE_FALLBACK"
_KERNELS_ROOT = Path(__file__).resolve().parent.parent  # llm_kernels/kernels


# --------------------------------------------------------------------------- cache keying
def kernel_source_hash(root: Path | None = None) -> str:
    """SHA-256 (hex, first 16 digits) of every ``*.py`` under ``llm_kernels/kernels``.

    Each file contributes its path relative to ``root`` and its bytes (sorted by path), so
    adding, removing, renaming or editing any kernel module changes the hash."""
    root = _KERNELS_ROOT if root is None else Path(root)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py"), key=lambda q: q.relative_to(root).as_posix()):
        if "__pycache__" in p.parts:
            continue
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _default_cache_root() -> Path:
    base = os.environ.get("LLM_KERNELS_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "llm_kernels"
    return root / "numba"


SOURCE_HASH = kernel_source_hash()
#: Set next to ``NUMBA_CACHE_DIR`` when this module chose the directory, so that a child
#: process (which inherits both) recomputes its own (its tier or sources may differ) instead
#: of taking the parent's as a user setting.
_AUTO_CACHE_ENV = "LLM_KERNELS_NUMBA_CACHE_AUTO"
_USER_CACHE_DIR = os.environ.get("NUMBA_CACHE_DIR") or None
if _USER_CACHE_DIR is not None and _USER_CACHE_DIR == os.environ.get(_AUTO_CACHE_ENV):
    _USER_CACHE_DIR = None
if _USER_CACHE_DIR is None:  # the tier sub-directory is added once the tier is known (below)
    os.environ["NUMBA_CACHE_DIR"] = str(_default_cache_root() / SOURCE_HASH)
_USER_THREADING = os.environ.get("NUMBA_THREADING_LAYER") or None
if _USER_THREADING is None:
    os.environ["NUMBA_THREADING_LAYER"] = "omp"

import numba
from numba.core import config as _nb_config

# numba may have been imported before us (its config is read once at numba import); the
# cache locator and the threading-layer launcher read these attributes lazily, so setting
# them here is effective as long as nothing has been compiled/launched yet. (CACHE_DIR is
# set further down, after the tier selection.)
if _USER_THREADING is None:
    try:
        from numba.np.ufunc import omppool  # noqa: F401
        _nb_config.THREADING_LAYER = "omp"
    except ImportError:  # no OpenMP runtime: let numba pick (tbb / workqueue)
        os.environ.pop("NUMBA_THREADING_LAYER", None)
        _nb_config.THREADING_LAYER = "default"


def kernel_cache_dir() -> str:
    """The Numba cache directory in effect (``numba.config.CACHE_DIR``)."""
    return str(_nb_config.CACHE_DIR)


def prune_stale_caches(dry_run: bool = False) -> list[str]:
    """Delete cache directories of *other* source hashes under the default cache root.

    Does nothing (returns ``[]``) when the user set ``NUMBA_CACHE_DIR``. Returns the
    removed (or, with ``dry_run``, the removable) directories."""
    if _USER_CACHE_DIR is not None:
        return []
    import shutil

    root = _default_cache_root()
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.name != SOURCE_HASH
             and len(p.name) == 16 and all(c in "0123456789abcdef" for c in p.name)]
    if not dry_run:
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
    return [str(p) for p in stale]


# --------------------------------------------------------------------------- CPU features
def _features() -> dict[str, bool]:
    """Features of the CPU that Numba compiles for: the host's, unless the user overrode
    the target with ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` (then those flags count)."""
    import llvmlite.binding as llb

    if _nb_config.CPU_FEATURES:
        out: dict[str, bool] = {}
        for f in str(_nb_config.CPU_FEATURES).split(","):
            f = f.strip()
            if len(f) > 1 and f[0] in "+-":
                out[f[1:]] = f[0] == "+"
        return out
    if _nb_config.CPU_NAME and _nb_config.CPU_NAME != "host":
        return {}  # e.g. NUMBA_CPU_NAME=generic: assume no AVX-512 extensions
    return {k: bool(v) for k, v in dict(llb.get_host_cpu_features()).items()}


CPU_FEATURES: dict[str, bool] = _features()
#: 256-bit integer SIMD + FMA (``vpmaddubsw``/``vpmaddwd``/``vpsignb`` on ymm): tier avx2.
HAS_AVX2: bool = CPU_FEATURES.get("avx2", False) and CPU_FEATURES.get("fma", False)
HAS_AVX512F: bool = CPU_FEATURES.get("avx512f", False)
HAS_AVX512BW: bool = HAS_AVX512F and CPU_FEATURES.get("avx512bw", False)
#: ``vpdpbusd`` on zmm registers (AVX512-VNNI; needs AVX512F/BW for the loads/shuffles).
HAS_VNNI: bool = HAS_AVX512BW and CPU_FEATURES.get("avx512vnni", False)
#: ``vdpbf16ps`` / ``vcvtne2ps2bf16`` (AVX512_BF16).
HAS_AVX512BF16: bool = HAS_AVX512F and CPU_FEATURES.get("avx512bf16", False)
#: ``LLM_KERNELS_FORCE_FALLBACK`` set to anything but ''/0/false/no/off (read at import).
FORCE_FALLBACK: bool = os.environ.get(FORCE_FALLBACK_ENV, "").strip().lower() not in (
    "", "0", "false", "no", "off")

# --------------------------------------------------------------------------- tiers
TIER_ENV = "LLM_KERNELS_TIER"
#: Kernel tiers, lowest to highest; each needs the CPU features of the ones below it too.
TIERS: tuple[str, ...] = ("plain", "avx2", "avx512-vnni", "avx512-vnni-bf16")
_TIER_OK = {"plain": True, "avx2": HAS_AVX2, "avx512-vnni": HAS_AVX2 and HAS_VNNI,
            "avx512-vnni-bf16": HAS_AVX2 and HAS_VNNI and HAS_AVX512BF16}
#: The best tier this CPU (Numba's compile target) supports.
CPU_TIER: str = [t for t in TIERS if _TIER_OK[t]][-1]


class TierError(ConfigError):
    """``LLM_KERNELS_TIER`` names an unknown tier, one the CPU lacks, or contradicts
    ``LLM_KERNELS_FORCE_FALLBACK`` (raised at import, before anything is compiled)."""


def select_tier(requested: str | None, force_fallback: bool = False, cpu_tier: str | None = None) -> str:
    """The tier to run: ``requested`` (the value of ``LLM_KERNELS_TIER``; None/'' = the best
    the CPU supports), ``plain`` when ``force_fallback``.

    Raises :class:`TierError` (a ``ConfigError``/``ValueError``) naming the variable, the
    value and the CPU's best tier for an unknown tier, a tier above ``cpu_tier`` (compiling
    its intrinsics would abort the process in LLVM), or a tier other than plain together
    with ``LLM_KERNELS_FORCE_FALLBACK``."""
    cpu = CPU_TIER if cpu_tier is None else cpu_tier
    req = (requested or "").strip().lower()
    if not req:
        return "plain" if force_fallback else cpu
    if req not in TIERS:
        raise TierError(f"{TIER_ENV}={requested!r} is not a tier; expected one of {', '.join(TIERS)} "
                        f"(this CPU's best tier: {cpu})")
    if TIERS.index(req) > TIERS.index(cpu):
        raise TierError(f"{TIER_ENV}={requested!r}: this CPU lacks the features of tier {req}; "
                        f"its best tier is {cpu} (choose {', '.join(TIERS[:TIERS.index(cpu) + 1])})")
    if force_fallback and req != "plain":
        raise TierError(f"{TIER_ENV}={requested!r} contradicts {FORCE_FALLBACK_ENV}=1 (= tier plain); "
                        f"set only one of them (this CPU's best tier: {cpu})")
    return req


#: The tier this process runs (``LLM_KERNELS_TIER``, read once at import; default = CPU_TIER).
TIER: str = select_tier(os.environ.get(TIER_ENV), FORCE_FALLBACK)
_RANK = TIERS.index(TIER)
#: INT8 register tile the packed-layout kernels compile in this process, which is also the
#: name of the packed weight layout they read: ``"vnni"`` (``vpdpbusd`` zmm,
#: ``common.x86``), ``"avx2"`` (sign-folded ``vpmaddubsw`` ymm, ``common.x86_avx2``) or
#: None (the CPU has neither). Tier plain keeps the CPU's best tile so that tests can still
#: call the packed kernels explicitly; nothing selects that layout by default then.
INT8_TILE: str | None = (
    "vnni" if TIERS.index(TIER if TIER != "plain" else CPU_TIER) >= TIERS.index("avx512-vnni")
    else ("avx2" if (TIER if TIER != "plain" else CPU_TIER) == "avx2" else None))
#: The INT8 kernels use the packed layout :data:`INT8_TILE` (tier avx2 and above).
USE_INT8_TILES: bool = _RANK >= TIERS.index("avx2") and INT8_TILE is not None
#: The VNNI kernels are in use (tier avx512-vnni and above).
USE_VNNI: bool = _RANK >= TIERS.index("avx512-vnni")
#: The ``vdpbf16ps`` bf16 dot kernels are in use (tier avx512-vnni-bf16).
USE_BF16: bool = TIER == "avx512-vnni-bf16"

if _USER_CACHE_DIR is None:
    # Numba keys its cache on source + CPU, not on our tier, and the kernels pick their tile
    # intrinsics through module globals at import: one cache directory per tier.
    os.environ["NUMBA_CACHE_DIR"] = os.environ[_AUTO_CACHE_ENV] = str(_default_cache_root() / SOURCE_HASH / TIER)
    _nb_config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]


def dispatch_path() -> str:
    """Active INT8 kernel family: ``"vnni"`` (AVX512-VNNI register tiles), ``"avx2"`` (AVX2
    register tiles) or ``"fallback"`` (plain auto-vectorised Numba: tier plain, i.e. a CPU
    without AVX2, ``LLM_KERNELS_FORCE_FALLBACK=1`` or ``LLM_KERNELS_TIER=plain``)."""
    return INT8_TILE if USE_INT8_TILES else "fallback"  # type: ignore[return-value]


def dispatch_tier() -> str:
    """The CPU tier the kernels run on (:data:`TIER`), for logs, benchmarks and bug reports:
    ``"avx512-vnni-bf16"`` (VNNI INT8 and ``vdpbf16ps`` bf16 dots), ``"avx512-vnni"``,
    ``"avx2"`` (AVX2 INT8 tiles) or ``"plain"`` (auto-vectorised Numba)."""
    return TIER


def cached_kernel_count() -> int:
    """Numba index files (``*.nbi``) in :func:`kernel_cache_dir`: 0 means the kernels will
    compile on first use (tens of seconds), not load from the cache."""
    root = Path(kernel_cache_dir())
    try:
        return sum(1 for _ in root.rglob("*.nbi")) if root.is_dir() else 0
    except OSError:
        return 0


def dispatch_info() -> dict[str, Any]:
    """Everything that decides which code runs: features, env override, path, cache dir,
    threading layer, source hash (for logs and bug reports)."""
    return {
        "path": dispatch_path(), "tier": dispatch_tier(), "cpu_tier": CPU_TIER,
        "tier_env": os.environ.get(TIER_ENV) or None, "int8_tile": INT8_TILE,
        "has_avx2": HAS_AVX2, "has_avx512f": HAS_AVX512F, "has_avx512bw": HAS_AVX512BW,
        "has_vnni": HAS_VNNI, "has_avx512bf16": HAS_AVX512BF16,
        "force_fallback": FORCE_FALLBACK,
        "numba_cache_dir": kernel_cache_dir(),
        "cache_dir_from_user": _USER_CACHE_DIR is not None,
        "threading_layer_config": str(_nb_config.THREADING_LAYER),
        "source_hash": SOURCE_HASH,
        "numba": numba.__version__,
    }


# --------------------------------------------------------------------------- decorator
def njit_kernel(fn: Callable | None = None, *, parallel: bool = False, fastmath: Any = False,
                cache: bool = True, **kw: Any) -> Any:
    """``numba.njit`` with the project defaults; use it for every kernel.

    ``@njit_kernel`` or ``@njit_kernel(parallel=True, fastmath=...)``. Defaults:
    ``cache=True`` (into the source-hash keyed directory above), ``fastmath=False``
    (bit-exact kernels must not let LLVM reassociate; opt in per kernel only where the
    result does not depend on operation order, e.g. a max), ``error_model="numpy"`` (no
    ZeroDivisionError branches), ``boundscheck=False``, ``nogil=True``. Extra keyword
    arguments go to ``numba.njit``.
    """
    opts = {"cache": cache, "parallel": parallel, "fastmath": fastmath,
            "error_model": "numpy", "boundscheck": False, "nogil": True}
    opts.update(kw)

    def deco(f: Callable) -> Any:
        return numba.njit(**opts)(f)

    return deco(fn) if fn is not None else deco


# --------------------------------------------------------------------------- serial twins
SERIAL_WORK_ENV = "LLM_KERNELS_SERIAL_WORK"
#: Work (multiply-adds, or elements read and written, as the caller estimates it) below which
#: :func:`sized` hands out a kernel's serial twin. A parallel region costs ~2-3 µs to launch
#: on the 2-core machines (an empty ``prange`` 2.4 µs vs a serial call 0.4 µs, Zen 3) and a
#: decode step of a small model launched ~135 of them; at DeepSeek-V4 Flash dims and T = 1
#: the serial twin wins below ~2^16 elements (``hc`` collapse 16 Ki: 7.2 -> 2.8 µs, the INT8
#: quantisation of one 4096-row 5.4 -> 2.3 µs) and loses above (``hc_post``, 82 Ki: 17 vs 29
#: µs). ``LLM_KERNELS_SERIAL_WORK=0`` (read at import) never uses a twin.
SERIAL_WORK: int = int(os.environ.get(SERIAL_WORK_ENV, "65536") or 0)
_TWINS: dict = {}


def serial_twin(kernel: Any) -> Any:
    """The serial twin of the Numba dispatcher ``kernel``: the same Python function compiled
    with ``parallel=False`` (each ``prange`` runs as a plain loop on the calling thread), with
    every jitted function it calls by a global or closure name replaced by that function's own
    twin (recursively), so no parallel region is launched anywhere below it. Every output is
    bitwise the parallel kernel's: each ``prange`` iteration owns its outputs and no ``prange``
    carries a floating-point reduction (the rule of this module), so running the iterations in
    order on one thread computes the same values. A kernel that launches nothing is its own
    twin. Compiled lazily on first use, into the same on-disk cache as the kernel (the twin's
    name is the kernel's with ``__serial`` appended; an uncached kernel's twin is uncached)."""
    twin = _TWINS.get(kernel)
    if twin is not None:
        return twin
    import types

    from numba.core.caching import NullCache
    from numba.core.registry import CPUDispatcher

    if not isinstance(kernel, CPUDispatcher):  # e.g. a test's Python wrapper: called as it is
        return kernel
    _TWINS[kernel] = kernel  # a recursive call sees the kernel itself (no cycle)
    f = kernel.py_func
    glb = f.__globals__
    remap = {}
    for name in f.__code__.co_names:
        v = glb.get(name)
        if isinstance(v, CPUDispatcher):
            tv = serial_twin(v)
            if tv is not v:
                remap[name] = tv
    cells = f.__closure__
    if cells:
        new_cells = []
        for c in cells:
            v = c.cell_contents
            tv = serial_twin(v) if isinstance(v, CPUDispatcher) else v
            new_cells.append(types.CellType(tv) if tv is not v else c)
        if any(n is not c for n, c in zip(new_cells, cells)):
            cells = tuple(new_cells)
    opts = {k: v for k, v in kernel.targetoptions.items() if k != "nopython"}
    if not remap and cells is f.__closure__ and not opts.get("parallel", False):
        return kernel
    g = dict(glb)
    g.update(remap)
    nf = types.FunctionType(f.__code__, g, f.__name__, f.__defaults__, cells)
    nf.__qualname__, nf.__module__, nf.__doc__ = f.__qualname__ + "__serial", f.__module__, f.__doc__
    opts["parallel"] = False
    twin = _TWINS[kernel] = numba.njit(cache=not isinstance(kernel._cache, NullCache), **opts)(nf)
    return twin


def sized(kernel: Any, work: int) -> Any:
    """``kernel`` for a call of ``work`` multiply-adds (or elements touched), or its
    :func:`serial_twin` when ``work < SERIAL_WORK``: a small call (a decode-sized step of a
    small stage) skips the parallel-region launches, whose cost there exceeds the work;
    either gives the same bits."""
    return serial_twin(kernel) if work < SERIAL_WORK else kernel
