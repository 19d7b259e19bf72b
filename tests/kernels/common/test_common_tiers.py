"""The dispatcher picks the best kernel tier the CPU reports (``kernel_tiers``): flags from
/proc/cpuinfo, cross-checked with llvmlite's host features, ``jit``'s ``HAS_*`` flags,
``dispatch_path()`` and the modules' BF16 switches; ``LLM_KERNELS_FORCE_FALLBACK`` gives the
plain tier, ``LLM_KERNELS_TIER`` any tier the CPU supports (an unsupported or unknown one is a
clear error at import); the pytest header names the tier."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kernel_tiers as KT
import pytest

from llm_kernels.kernels.common import jit

REPO = Path(__file__).resolve().parents[3]
KERNEL_TESTS = Path(KT.__file__).resolve().parent


def _cpuinfo_or_skip() -> dict:
    info = KT.cpuinfo()
    if info is None:
        pytest.skip(f"needs {KT.CPUINFO} (Linux) to read the CPU's flags, whatever the tier; "
                    f"dispatcher: tier {KT.active_tier()}")
    return info


def _target_overridden() -> bool:
    import numba

    return bool(numba.config.CPU_FEATURES) or (numba.config.CPU_NAME not in (None, "", "host"))


def test_tier_logic_on_synthetic_flags():
    A = {"avx2", "fma"}
    assert KT.best_tier(set()) == "plain"
    assert KT.best_tier({"avx2"}) == "plain"  # AVX2 without FMA (no such CPU, but the tier needs both)
    assert KT.best_tier(A) == "avx2"
    assert KT.best_tier(A | {"avx512f", "avx512bw"}) == "avx2"
    assert KT.best_tier(A | {"avx512f", "avx512bw", "avx512_vnni"}) == "avx512-vnni"
    assert KT.best_tier(A | {"avx512f", "avx512_vnni", "avx512_bf16"}) == "avx2"  # no BW
    assert KT.best_tier(A | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}) == "avx512-vnni-bf16"
    assert KT.best_tier(A | {"avx512f", "avx512bw", "avx512vnni", "avx512bf16"}, llvm=True) == "avx512-vnni-bf16"
    assert KT.TIER_NAMES == jit.TIERS  # the tests' table and the dispatcher's order agree
    # tiers are cumulative: each needs the features of the ones below it
    for lo, hi in zip(KT.TIERS, KT.TIERS[1:]):
        assert set(lo.cpuinfo_flags) <= set(hi.cpuinfo_flags) and set(lo.llvm_features) <= set(hi.llvm_features)
        assert len(hi.cpuinfo_flags) == len(hi.llvm_features)
    assert KT.verdict("avx512-vnni-bf16", "avx512-vnni-bf16") == ""
    assert "LOWER" in KT.verdict("avx512-vnni-bf16", "plain")
    assert "LOWER" in KT.verdict("avx512-vnni", "plain")
    assert "LOWER" in KT.verdict("avx512-vnni", "avx2")
    assert "HIGHER" in KT.verdict("avx2", "avx512-vnni") and "avx512_vnni" in KT.verdict("avx2", "avx512-vnni")
    v = KT.verdict("avx512-vnni", "avx512-vnni-bf16")
    assert "HIGHER" in v and "avx512_bf16" in v
    assert "not a tier" in KT.verdict("plain", "bf16-without-vnni")


def test_llvm_host_features_agree_with_cpuinfo():
    """llvmlite (what Numba compiles for) and the kernel's /proc/cpuinfo flags agree on
    every feature a tier needs; ``jit.CPU_FEATURES`` is llvmlite's (no target override)."""
    import llvmlite.binding as llb

    flags = _cpuinfo_or_skip()["flags"]
    host = {k: bool(v) for k, v in dict(llb.get_host_cpu_features()).items()}
    for t in KT.TIERS:
        for cf, lf in zip(t.cpuinfo_flags, t.llvm_features):
            assert (cf in flags) == host.get(lf, False), (t.name, cf, lf)
    assert KT.best_tier(flags) == KT.best_tier({k for k, v in host.items() if v}, llvm=True)
    if not _target_overridden():
        assert jit.CPU_FEATURES == host


def test_dispatcher_picks_best_tier_the_cpu_reports():
    """Fails if the dispatcher picked a lower tier than /proc/cpuinfo says the CPU supports
    (or, with ``LLM_KERNELS_FORCE_FALLBACK``, anything but plain), or a higher one."""
    flags = _cpuinfo_or_skip()["flags"]
    if _target_overridden():
        pytest.skip("needs the host CPU as Numba's target (NUMBA_CPU_NAME/NUMBA_CPU_FEATURES override it), "
                    f"whatever the tier; {KT.this_cpu()}")
    cpu_best = KT.best_tier(flags)
    # jit's feature flags, one by one
    assert jit.HAS_AVX512F == ("avx512f" in flags)
    assert jit.HAS_AVX512BW == ({"avx512f", "avx512bw"} <= flags)
    assert jit.HAS_VNNI == (set(KT.tier("avx512-vnni").cpuinfo_flags) <= flags)
    assert jit.HAS_AVX512BF16 == ({"avx512f", "avx512_bf16"} <= flags)
    assert KT.supported_tier() == cpu_best, KT.verdict(cpu_best, KT.supported_tier())
    assert jit.HAS_AVX2 == ({"avx2", "fma"} <= flags)
    assert jit.CPU_TIER == cpu_best
    # what this process runs (LLM_KERNELS_TIER / LLM_KERNELS_FORCE_FALLBACK, else the best)
    expected = KT.expected_tier(cpu_best)
    picked = KT.active_tier()
    assert picked == expected == jit.dispatch_tier(), KT.verdict(expected, picked) + f" ({jit.dispatch_info()})"
    assert jit.dispatch_path() == ("vnni" if KT.rank(picked) >= KT.rank("avx512-vnni")
                                   else "avx2" if picked == "avx2" else "fallback")
    assert jit.USE_VNNI == (jit.dispatch_path() == "vnni")


_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import kernel_tiers as KT
from llm_kernels.kernels.common import jit
print(json.dumps({"tier": KT.active_tier(), "supported": KT.supported_tier(), "path": jit.dispatch_path(),
                  "force": jit.FORCE_FALLBACK, "header": KT.header_line(), "jit_tier": jit.TIER,
                  "int8_tile": jit.INT8_TILE, "cache": jit.kernel_cache_dir(),
                  "from_user": jit.dispatch_info()["cache_dir_from_user"]}))
"""


def _child_run(force: str | None = None, tier: str | None = None, extra: dict | None = None):
    env = dict(os.environ)
    env.pop(jit.FORCE_FALLBACK_ENV, None)
    env.pop(jit.TIER_ENV, None)
    if force is not None:
        env[jit.FORCE_FALLBACK_ENV] = force
    if tier is not None:
        env[jit.TIER_ENV] = tier
    env.update(extra or {})
    return subprocess.run([sys.executable, "-c", _CHILD, str(KERNEL_TESTS)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def _child(force: str | None = None, tier: str | None = None) -> dict:
    r = _child_run(force, tier)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_force_fallback_gives_plain_and_unset_gives_best():
    """Both settings in fresh processes, whatever this process was started with."""
    best = KT.supported_tier()
    for force in (None, "0", "off"):
        c = _child(force)
        assert not c["force"] and c["tier"] == best, (force, KT.verdict(best, c["tier"]))
        assert "forced fallback: no," in c["header"] and f"tier {best} " in c["header"]
    for force in ("1", "yes"):
        c = _child(force)
        assert c["force"] and c["supported"] == best, force
        assert c["tier"] == "plain" and c["path"] == "fallback", (force, KT.verdict("plain", c["tier"]))
        assert c["header"].startswith("llm_kernels kernels: tier plain (no intrinsics), forced fallback: yes")


def test_select_tier_rules():
    """``jit.select_tier`` (what ``jit`` runs at import): default = the CPU's best, forced
    fallback = plain, ``LLM_KERNELS_TIER`` = any tier up to the CPU's; every error names the
    variable, the value and the CPU's best tier."""
    assert jit.select_tier(None, False, "avx2") == "avx2"
    assert jit.select_tier("", True, "avx512-vnni") == "plain"
    assert jit.select_tier(" AVX2 ", False, "avx512-vnni-bf16") == "avx2"
    assert jit.select_tier("plain", True, "avx2") == "plain"
    assert jit.select_tier("avx512-vnni", False, "avx512-vnni-bf16") == "avx512-vnni"
    for req, force, cpu, words in [("avx512-vnni", False, "avx2", "lacks"),
                                   ("avx2", False, "plain", "lacks"),
                                   ("avx3", False, "avx2", "not a tier"),
                                   ("avx2", True, "avx512-vnni", "contradicts")]:
        with pytest.raises(jit.TierError) as e:
            jit.select_tier(req, force, cpu)
        msg = str(e.value)
        assert f"LLM_KERNELS_TIER={req!r}" in msg and words in msg and f"best tier: {cpu}" in msg.replace(
            "best tier is", "best tier:"), msg
    assert issubclass(jit.TierError, ValueError)


def test_forced_tier_is_honoured_in_fresh_processes():
    """``LLM_KERNELS_TIER=<t>`` for every tier this CPU supports: the dispatcher runs ``t``
    (the modules' switches agree, ``kernel_tiers.active_tier``), keys the kernel cache on
    it, and the report header names it and the CPU's best."""
    best = KT.supported_tier()
    for t in KT.TIER_NAMES[:KT.rank(best) + 1]:
        c = _child(tier=t)
        assert c["tier"] == c["jit_tier"] == t, (t, KT.verdict(t, c["tier"]))
        assert c["supported"] == best
        assert c["path"] == ("fallback" if t == "plain" else "avx2" if t == "avx2" else "vnni")
        assert c["int8_tile"] == ("avx2" if t == "avx2" else c["int8_tile"])
        if not jit.dispatch_info()["cache_dir_from_user"]:  # the child inherits our NUMBA_CACHE_DIR, marked ours
            assert not c["from_user"] and Path(c["cache"]).name == t, c  # .../numba/<source hash>/<tier>
        assert f"tier {t} " in c["header"] and ((f"(CPU supports {best})" in c["header"]) == (t != best))


def _without_avx512() -> str:
    """``NUMBA_CPU_FEATURES`` for this host minus AVX-512/AVX-VNNI (a Zen 3-class CPU)."""
    import llvmlite.binding as llb

    feats = dict(llb.get_host_cpu_features())
    off = ("avx512", "avx10", "avxvnni", "amx", "evex512")
    return ",".join(("+" if v and not k.startswith(off) else "-") + k for k, v in feats.items())


def test_unsupported_forced_tier_is_a_clear_error():
    """Asking for a tier above the CPU's is a ``TierError`` at import naming the variable,
    the value and the CPU's best tier (nothing is compiled: an unsupported intrinsic would
    abort the process in LLVM). Above the top tier of an AVX-512 host, a CPU without AVX-512
    is emulated through Numba's target override (which ``jit`` reads its features from)."""
    best = KT.supported_tier()
    extra = None
    if best == KT.TIER_NAMES[-1]:
        if not jit.HAS_AVX2:  # pragma: no cover - an AVX-512 CPU without AVX2 does not exist
            pytest.skip(KT.need_reason("avx2", "to emulate a lower CPU"))
        extra, best = {"NUMBA_CPU_NAME": "znver3", "NUMBA_CPU_FEATURES": _without_avx512()}, "avx2"
    want = KT.TIER_NAMES[KT.rank(best) + 1]
    r = _child_run(tier=want, extra=extra)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "TierError" in last and f"LLM_KERNELS_TIER={want!r}" in last and f"best tier is {best}" in last, last
    if extra:  # the emulated CPU runs avx2 by default
        r = _child_run(extra=extra)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout.strip().splitlines()[-1])["tier"] == "avx2"
    for tier, force, words in (("avx3", None, "is not a tier"), ("avx2", "1", "contradicts")):
        r = _child_run(force=force, tier=tier)
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        assert r.returncode != 0 and "TierError" in last and words in last, last


def test_prune_stale_caches_keeps_this_source_hash(tmp_path, monkeypatch):
    """Other source hashes' directories go; this hash's (all its tier sub-directories) stays."""
    monkeypatch.setattr(jit, "_USER_CACHE_DIR", None)
    monkeypatch.setattr(jit, "_default_cache_root", lambda: tmp_path)
    for d in (f"{jit.SOURCE_HASH}/avx2", f"{jit.SOURCE_HASH}/{jit.TIER}", "0123456789abcdef/avx2", "notahash"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    assert jit.prune_stale_caches(dry_run=True) == [str(tmp_path / "0123456789abcdef")]
    assert (tmp_path / "0123456789abcdef").exists()
    assert jit.prune_stale_caches() == [str(tmp_path / "0123456789abcdef")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([jit.SOURCE_HASH, "notahash"])
    assert (tmp_path / jit.SOURCE_HASH / "avx2").is_dir()


_HEADER = re.compile(r"^llm_kernels kernels: tier (?P<tier>[a-z0-9-]+) \((?P<feats>[^)]*)\), "
                     r"forced fallback: (?P<forced>yes|no)(?: \(CPU supports (?P<sup>[a-z0-9-]+)\))?, CPU: (?P<cpu>.+)$")


def test_report_header_names_the_tier(request):
    """The ``pytest_report_header`` hook of ``tests/conftest.py``, called through pytest."""
    lines = request.config.hook.pytest_report_header(config=request.config, start_path=request.config.rootpath)
    flat = [ln for x in lines for ln in ([x] if isinstance(x, str) else x)]
    ours = [ln for ln in flat if ln.startswith("llm_kernels kernels:")]
    assert len(ours) == 1, flat
    m = _HEADER.match(ours[0])
    assert m, ours[0]
    assert m["tier"] == KT.active_tier() and m["feats"] == KT.tier(KT.active_tier()).features
    assert m["forced"] == ("yes" if jit.FORCE_FALLBACK else "no")
    assert m["cpu"] == KT.cpu_model()
    if KT.cpuinfo() is not None:
        with open(KT.CPUINFO) as f:
            models = {ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")}
        assert m["cpu"] in models

