"""The dispatcher picks the best kernel tier the CPU reports (``kernel_tiers``): flags from
/proc/cpuinfo, cross-checked with llvmlite's host features, ``jit``'s ``HAS_*`` flags,
``dispatch_path()`` and the modules' BF16 switches; ``LLM_KERNELS_FORCE_FALLBACK`` gives the
plain tier; the pytest header names the tier."""

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
    assert KT.best_tier(set()) == "plain"
    assert KT.best_tier({"avx2", "fma"}) == "plain"  # (until an AVX2 tier exists)
    assert KT.best_tier({"avx512f", "avx512bw"}) == "plain"
    assert KT.best_tier({"avx512f", "avx512bw", "avx512_vnni"}) == "avx512-vnni"
    assert KT.best_tier({"avx512f", "avx512_vnni", "avx512_bf16"}) == "plain"  # no BW
    assert KT.best_tier({"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}) == "avx512-vnni-bf16"
    assert KT.best_tier({"avx512f", "avx512bw", "avx512vnni", "avx512bf16"}, llvm=True) == "avx512-vnni-bf16"
    # tiers are cumulative: each needs the features of the ones below it
    for lo, hi in zip(KT.TIERS, KT.TIERS[1:]):
        assert set(lo.cpuinfo_flags) <= set(hi.cpuinfo_flags) and set(lo.llvm_features) <= set(hi.llvm_features)
        assert len(hi.cpuinfo_flags) == len(hi.llvm_features)
    assert KT.verdict("avx512-vnni-bf16", "avx512-vnni-bf16") == ""
    assert "LOWER" in KT.verdict("avx512-vnni-bf16", "plain")
    assert "LOWER" in KT.verdict("avx512-vnni", "plain")
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
    # what this process runs
    expected = "plain" if jit.FORCE_FALLBACK else cpu_best
    picked = KT.active_tier()
    assert picked == expected, KT.verdict(expected, picked) + f" ({jit.dispatch_info()})"
    assert jit.dispatch_path() == ("vnni" if KT.rank(picked) >= KT.rank("avx512-vnni") else "fallback")
    assert jit.USE_VNNI == (jit.dispatch_path() == "vnni")


_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import kernel_tiers as KT
from llm_kernels.kernels.common import jit
print(json.dumps({"tier": KT.active_tier(), "supported": KT.supported_tier(), "path": jit.dispatch_path(),
                  "force": jit.FORCE_FALLBACK, "header": KT.header_line()}))
"""


def _child(force: str | None) -> dict:
    env = dict(os.environ)
    env.pop(jit.FORCE_FALLBACK_ENV, None)
    if force is not None:
        env[jit.FORCE_FALLBACK_ENV] = force
    r = subprocess.run([sys.executable, "-c", _CHILD, str(KERNEL_TESTS)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
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

