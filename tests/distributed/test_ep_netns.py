"""Ranks as hosts: 2 ranks in separate network namespaces joined by veth pairs and a bridge
(``python -m llm_kernels.distributed.netns``), their links shaped to 1 Mbit/s (``tc``
netem, or a token bucket where the kernel lacks netem): the logits file is bitwise the
one-process file, the prefill's combine takes the time the shaped links need (so the
traffic crossed them, not loopback), the interface counters hold at least the combine's
bytes, and nothing is left behind. Needs root and iproute2 (skipped, with the reason,
without them)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llm_kernels.checkpoint import write_random_checkpoint
from llm_kernels.distributed.netns import available
from llm_kernels.models import preset

WHY = available()


@pytest.mark.skipif(WHY is not None, reason=f"network namespaces unavailable: {WHY}")
def test_two_ranks_in_network_namespaces_with_netem(tmp_path):
    ckpt = write_random_checkpoint(preset("mini"), tmp_path / "mini", seed=8, dtype=torch.float32, progress=False)
    args = ["logits", "--checkpoint", str(ckpt), "--input-ids", "1,2,3,4,5", "--input-ids", "7,8,9",
            "--decode-ids", "10,11", "--decode-ids", "13,14", "--threads", "1"]
    one = subprocess.run([sys.executable, "-m", "llm_kernels", *args, "--out", str(tmp_path / "one.st")],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "llm_kernels.distributed.netns", "--nproc", "2", "--rate", "1mbit",
                        "--", *args, "--out", str(tmp_path / "ns.st")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    tag = re.search(r"namespaces llmk(\d+)-0\.\.llmk\1-1 on bridge lkb\1, rank 0 at 10\.77\.0\.1:29500; shaping: "
                    r"(netem|tbf \(burst 3028 B\)), rate 1mbit, delay 0", r.stderr)
    assert tag, r.stderr[-3000:]
    a, b = load_file(str(tmp_path / "one.st")), load_file(str(tmp_path / "ns.st"))
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)
    # prefill: 4 all-gathers of ~5.3 KB per rank; at 125 kB/s each needs >= 20 ms beyond a 3 KB
    # burst (measured 160 ms; unshaped ~4 ms)
    m = re.search(r"prefill ([0-9.]+) KiB sent, [0-9.]+ KiB received, ([0-9.]+) ms; decode \(2 steps\) per step: "
                  r"([0-9.]+) KiB sent", r.stdout)
    assert m and float(m.group(2)) >= 40, r.stdout
    combine = (float(m.group(1)) + 2 * float(m.group(3))) * 1024
    for rank in (0, 1):
        tx, rx = map(int, re.search(rf"rank {rank} eth0: sent (\d+) B, received (\d+) B", r.stderr).groups())
        assert tx > combine and rx > combine, r.stderr
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"llmk{tag.group(1)}-" not in left
    links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert f"lkb{tag.group(1)}" not in links and f"lkv{tag.group(1)}r" not in links
