"""Ranks as separate hosts on one machine: one Linux network namespace per rank, joined by
veth pairs to a bridge, so that the ranks' traffic crosses a real network stack (IP, TCP,
qdiscs, a bridge) instead of loopback; optionally shaped with ``tc netem`` (rate, delay)
to emulate e.g. 10 / 25 GbE links.

::

    python -m llm_kernels.distributed.netns --nproc 2 [--rate 10gbit] [--delay 20us] \\
        -- logits --checkpoint DIR --input-ids 1,2,3 --out L.safetensors

Rank ``r`` runs in namespace ``llmk<tag>-<r>`` with address ``10.77.0.<r+1>/24`` on its
``eth0`` (rank 0 hosts the rendezvous store); ``tag`` keeps concurrent runs apart. The root
namespace's side has no address (runs may reuse the subnet). Everything is removed on exit,
error or Ctrl-C. Needs root (``CAP_NET_ADMIN`` / ``CAP_SYS_ADMIN``) and iproute2 (``ip``,
``tc``); without them :class:`NetnsError` says which command failed and why.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

from .launch import spawn_local

__all__ = ["NetNamespaces", "NetnsError", "main", "available"]


class NetnsError(RuntimeError):
    """A namespace / link / qdisc command failed (names the command and its stderr)."""


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise NetnsError(f"'{' '.join(cmd)}' failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")


def available() -> str | None:
    """None when namespaces can be made here, else the reason (no ``ip``/``tc``, not root,
    or the probe namespace failed)."""
    if not shutil.which("ip") or not shutil.which("tc"):
        return "iproute2 (ip, tc) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"llmkprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", name)
        _run("ip", "netns", "del", name)
    except NetnsError as e:
        return str(e)
    return None


_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12, "bps": 8, "kbps": 8e3, "mbps": 8e6,
          "gbps": 8e9}


def _rate_bps(rate: str) -> float:
    """``"10gbit"`` -> 1e10 bits/s (tc's units); ValueError naming ``--rate`` otherwise."""
    m = re.fullmatch(r"([0-9.]+)\s*([a-z]+)", rate.strip().lower())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"--rate must be a number and a tc unit ({', '.join(_UNITS)}), e.g. 10gbit; got {rate!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def interface_bytes(ns: str) -> tuple[int, int]:
    """``(tx, rx)`` byte counters of ``eth0`` in namespace ``ns``."""
    base = "/sys/class/net/eth0/statistics/"
    out = subprocess.run(["ip", "netns", "exec", ns, "cat", base + "tx_bytes", base + "rx_bytes"],
                         capture_output=True, text=True).stdout.split()
    return (int(out[0]), int(out[1])) if len(out) == 2 else (-1, -1)


class NetNamespaces:
    """``with NetNamespaces(n, rate="10gbit", delay="20us") as net: ...``: ``n`` namespaces on a
    bridge (see the module docstring); ``net.prefix(r)`` is the ``ip netns exec`` prefix of
    rank ``r``, ``net.addr(r)`` its address.

    Args:
        n: namespaces (1..250). rate / delay: ``tc netem`` egress shaping of every rank's
            ``eth0`` (tc syntax, e.g. ``"10gbit"``, ``"50us"``); None: unshaped.
        tag: distinguishes the names of concurrent runs (default: this process id mod 10^4).
    Raises ValueError for a bad ``n``; NetnsError when a command fails (what was made is
    removed again).
    """

    def __init__(self, n: int, rate: str | None = None, delay: str | None = None, tag: int | None = None):
        if not 1 <= n <= 250:
            raise ValueError(f"--nproc must lie in [1, 250] for network namespaces, got {n}")
        self.n, self.rate, self.delay = n, rate, delay
        self.tag = tag if tag is not None else os.getpid() % 10000
        self.bridge = f"lkb{self.tag}"
        self._made: list[tuple[str, ...]] = []  # undo commands, in reverse order of creation
        self.shaper = "none"
        if rate is not None:
            _rate_bps(rate)  # ValueError early

    def ns(self, r: int) -> str:
        return f"llmk{self.tag}-{r}"

    def addr(self, r: int) -> str:
        return f"10.77.0.{r + 1}"

    def prefix(self, r: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns(r)]

    def __enter__(self) -> "NetNamespaces":
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            self._made.append(("ip", "link", "del", self.bridge))
            _run("ip", "link", "set", self.bridge, "up")
            for r in range(self.n):
                ns, host, peer = self.ns(r), f"lkv{self.tag}r{r}", f"lkp{self.tag}r{r}"
                _run("ip", "netns", "add", ns)
                self._made.append(("ip", "netns", "del", ns))  # takes the veth pair with it
                _run("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
                _run("ip", "link", "set", peer, "netns", ns)
                _run("ip", "link", "set", host, "master", self.bridge, "up")
                _run("ip", "-n", ns, "link", "set", peer, "name", "eth0")
                _run("ip", "-n", ns, "addr", "add", f"{self.addr(r)}/24", "dev", "eth0")
                _run("ip", "-n", ns, "link", "set", "eth0", "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                if self.rate or self.delay:
                    self._shape(ns)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _shape(self, ns: str) -> None:
        """Egress shaping of ``ns``'s eth0: netem (delay and/or rate) when the kernel has it;
        else a token bucket (tbf) for ``rate`` alone, its burst 1 ms of the rate (at least two
        1514-byte frames), and NetnsError for ``delay`` (only netem delays)."""
        tc = ("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root")
        shape = (["delay", self.delay] if self.delay else []) + (["rate", self.rate] if self.rate else [])
        try:
            _run(*tc, "netem", *shape)
            self.shaper = "netem"
            return
        except NetnsError as e:
            if "unknown" not in str(e).lower():
                raise
            if self.delay:
                raise NetnsError(f"--delay needs tc netem, which this kernel lacks (sch_netem: {e}); --rate alone "
                                 "works with a token bucket") from None
        burst = max(int(_rate_bps(self.rate) / 8 / 1000), 2 * 1514)
        _run(*tc, "tbf", "rate", self.rate, "burst", str(burst), "latency", "100ms")
        self.shaper = f"tbf (burst {burst} B)"

    def __exit__(self, *exc) -> None:
        while self._made:
            cmd = self._made.pop()
            subprocess.run(cmd, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m llm_kernels.distributed.netns --nproc N [--rate R] [--delay D] -- <llm_kernels command>``;
    returns the launcher's exit code (2 for a bad option or a failed namespace command)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        print("error: give the llm_kernels command after '--', e.g. -- logits --checkpoint DIR ...", file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m llm_kernels.distributed.netns", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, required=True, help="ranks, one network namespace each")
    p.add_argument("--rate", default=None, help="tc netem rate per rank's link, e.g. 10gbit, 25gbit")
    p.add_argument("--delay", default=None, help="tc netem one-way delay per rank's egress, e.g. 20us")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on rank 0's address")
    a = p.parse_args(argv[:cut])
    why = available()
    if why:
        print(f"error: network namespaces unavailable: {why}", file=sys.stderr)
        return 2
    try:
        with NetNamespaces(a.nproc, rate=a.rate, delay=a.delay) as net:
            print(f"{a.nproc} ranks in namespaces {net.ns(0)}..{net.ns(a.nproc - 1)} on bridge {net.bridge}, "
                  f"rank 0 at {net.addr(0)}:{a.port}; shaping: {net.shaper}, rate {a.rate or 'unshaped'}, "
                  f"delay {a.delay or '0'}", file=sys.stderr, flush=True)
            # gloo binds to the address of the host name (127.0.0.1 here) unless told the interface
            rc = spawn_local(argv[cut + 1:], a.nproc, addr=net.addr(0), port=a.port, prefix=net.prefix,
                             env={"GLOO_SOCKET_IFNAME": "eth0"})
            for r in range(a.nproc):
                tx, rx = interface_bytes(net.ns(r))
                print(f"rank {r} eth0: sent {tx} B, received {rx} B (all traffic: TCP/IP, store, heartbeats, "
                      "collectives)", file=sys.stderr)
            return rc
    except (NetnsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
