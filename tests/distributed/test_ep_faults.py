"""Faults of an expert-parallel ``logits`` run: a rank killed (SIGKILL) or stopped (SIGSTOP)
mid-decode makes every other rank exit with an error naming it, within the stated bounds,
and no output file is written; a rank started on a different checkpoint (same preset and
shapes, another seed: identical tensor headers) is refused before loading. The faults are
injected with ``LLM_KERNELS_EP_FAULT=<rank>:<moe call>:<kill|stop>`` (the rank signals
itself at the start of that ``moe`` call: calls 1-4 are the prefill's 4 layers, 5-8 the
first decode step)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llm_kernels.checkpoint import write_random_checkpoint
from llm_kernels.distributed.launch import free_port
from llm_kernels.models import preset


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("epf")
    return tuple(write_random_checkpoint(preset("mini"), root / f"s{s}", seed=s, dtype=torch.float32,
                                         progress=False) for s in (5, 6))


def _args(ckpt: Path, out: Path) -> list[str]:
    return ["logits", "--checkpoint", str(ckpt), "--input-ids", "1,2,3,4,5", "--input-ids", "7,8,9",
            "--decode-ids", "10,11,12", "--decode-ids", "13,14,15", "--threads", "1", "--out", str(out)]


def _launch(args: list[str], fault: str, timeout: float):
    env = dict(os.environ, LLM_KERNELS_EP_FAULT=fault)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "llm_kernels", *args, "--ep-timeout", str(timeout)], env=env,
                       capture_output=True, text=True, timeout=300)
    return r, time.monotonic() - t0


def test_killed_rank_is_named_by_every_other_rank(ckpts, tmp_path):
    out = tmp_path / "k.safetensors"
    r, sec = _launch(_args(ckpts[0], out) + ["--nproc", "4"], "2:6:kill", timeout=60)
    assert r.returncode == 1, r.stderr[-3000:]
    for rank in (0, 1, 3):  # ranks 1 and 3 talk to rank 2 directly, rank 0 through the ring
        m = re.search(rf"error: rank {rank}: the MoE combine \(all_gather, call 6\) failed \(after ([0-9.]+) s, "
                      r"timeout 60 s\): rank 2 stopped answering", r.stderr)
        assert m, r.stderr[-3000:]
        # not the 60 s timeout: a killed peer's sockets close (observed 0.0-1.6 s: the ring
        # neighbours at once, the others when those exit)
        assert float(m.group(1)) < 30, r.stderr[-3000:]
    assert "rank 2 was killed by SIGKILL; the run of 4 ranks was aborted" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
    assert sec < 60, sec  # start-up of 4 ranks on 2 cores ~10 s, detection ~2 s, rank 0 lingers 5 s


def test_stopped_rank_is_named_after_the_timeout(ckpts, tmp_path):
    out = tmp_path / "s.safetensors"
    r, sec = _launch(_args(ckpts[0], out) + ["--nproc", "2"], "1:6:stop", timeout=4)
    assert r.returncode == 1, r.stderr[-3000:]
    m = re.search(r"error: rank 0: the MoE combine \(all_gather, call 6\) failed \(after ([0-9.]+) s, timeout 4 s\): "
                  r"rank 1 stopped answering \(killed, crashed or hung: no heartbeat", r.stderr)
    assert m and 3.9 < float(m.group(1)) < 10, r.stderr[-3000:]  # gloo's timeout
    assert "rank 1 was stopped; the run of 2 ranks was aborted" in r.stderr
    assert not out.exists()
    assert sec < 60, sec


def test_rank_with_another_checkpoint_is_refused(ckpts, tmp_path):
    """Two ranks started by hand, as torchrun on two hosts would (RANK / WORLD_SIZE /
    MASTER_* in the environment), rank 1 on a checkpoint of another seed."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   LOCAL_WORLD_SIZE="2", TORCH_CPP_LOG_LEVEL="FATAL")
        procs.append(subprocess.Popen([sys.executable, "-m", "llm_kernels",
                                       *_args(ckpts[rank], tmp_path / "d.safetensors"), "--ep-timeout", "30"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=120)[1] for p in procs]
    for rank, (p, err) in enumerate(zip(procs, errs)):
        assert p.returncode == 3, err[-3000:]
        assert f"error: rank {rank}: rank 1 has a different checkpoint (config.json, tensor headers, data samples) " \
               "than rank 0" in err, err[-3000:]
        assert "refused before loading" in err and "experts [" not in err  # nothing was loaded
    assert not (tmp_path / "d.safetensors").exists()


def test_rank_whose_routing_diverges_is_refused(ckpts, tmp_path):
    """Rank 1's router weights differ in the last bits (as on a host whose replicated layers
    round differently): the combine's routing digest stops both ranks at the first MoE call,
    naming the other rank, instead of mixing two routings."""
    worker = Path(__file__).with_name("ep_worker.py")
    code = ("import sys; from llm_kernels.distributed import spawn_local; "
            f"sys.exit(spawn_local([], 2, command=[sys.executable, {str(worker)!r}, {str(ckpts[0])!r}, "
            f"{str(tmp_path)!r}, '[[\"float32\", \"reference\", \"none\"]]', '[[1, 2, 3]]', '[[4]]']))")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, EP_WORKER_PERTURB_RANK="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    for rank, other in ((0, 1), (1, 0)):
        assert f"error: rank {rank}: RoutingMismatch: rank {other} routed this MoE step differently from rank " \
               f"{rank} (routes " in r.stderr, r.stderr[-3000:]
    assert "the replicated layers must compute bitwise alike on every rank" in r.stderr
    assert not (tmp_path / "0.safetensors").exists()


def test_slow_loading_rank_is_waited_for_and_a_dead_one_named(ckpts, tmp_path):
    """Loading has no collective timeout: rank 1 taking 8 s longer than rank 0 with
    ``--ep-timeout 5`` still completes (the ranks meet through the store while their
    heartbeats move); a rank killed before the meeting is named within seconds."""
    out = tmp_path / "slow.safetensors"
    r, _ = _launch(_args(ckpts[0], out) + ["--nproc", "2"], "1:0:sleep8", timeout=5)
    assert r.returncode == 0 and out.exists(), r.stderr[-3000:]
    r, sec = _launch(_args(ckpts[0], tmp_path / "dead.safetensors") + ["--nproc", "2"], "1:0:kill", timeout=60)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "error: rank 0: waiting for every rank to finish loading: rank 1 stopped answering (killed, crashed or " \
           "hung: no heartbeat for 1.5 s)" in r.stderr, r.stderr[-3000:]
    assert "rank 1 was killed by SIGKILL" in r.stderr and not (tmp_path / "dead.safetensors").exists()
    assert sec < 60, sec  # not the 60 s timeout
