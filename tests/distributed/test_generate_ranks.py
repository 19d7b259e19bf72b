"""``generate`` and the model-level ``bench`` over ranks (``--nproc N [--pp K]``): the
generated ids of 2 ranks (expert shards, or 2 pipeline stages) equal one process's, greedy
(DeepSeek-V4 mini) and seeded sampling (Qwen3 mini, 2 pipeline stages); rank 0 alone
prints; under ``torchrun`` the plain command runs one rank per process with the same ids;
the modes that cannot run over ranks are refused naming the option (``--chat``,
``--speculative`` with pipeline stages); ``--speculative mtp`` over expert shards gives
the one-process ids and acceptance; a ``bench
--nproc 2`` smoke run reports its ranks, bytes and communication. Every process runs one
thread (the float32 GEMMs' results depend on the thread count)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_kernels.checkpoint import write_random_checkpoint
from llm_kernels.models import preset

PROMPT = "1,2,3,4,5,6,7"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("genranks")
    return {name: write_random_checkpoint(preset(name), root / name, seed=11, dtype=torch.float32, progress=False)
            for name in ("mini", "qwen3-mini")}


def _run(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "llm_kernels", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _generate(ckpt: Path, *extra: str) -> tuple[list[int], str]:
    r = _run("generate", "--checkpoint", str(ckpt), "--prompt-ids", PROMPT, "--max-new-tokens", "10",
             "--ignore-eos", "--threads", "1", "--dtype", "float32", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("generated ids:")]
    assert len(lines) == 1, r.stdout  # rank 0 alone prints
    return [int(t) for t in lines[0].split(":", 1)[1].split(",")], r.stdout


@pytest.mark.parametrize("name, sampling, layouts", [
    ("mini", ["--temperature", "0"], [["--nproc", "2"], ["--nproc", "2", "--pp", "2"]]),
    ("qwen3-mini", ["--temperature", "0.9", "--top-k", "0", "--top-p", "1", "--seed", "7"], [["--nproc", "2"]]),
])
def test_generate_over_ranks_equals_one_process(ckpts, name, sampling, layouts):
    ref, _ = _generate(ckpts[name], *sampling)
    assert len(ref) == 10
    for lay in layouts:
        got, out = _generate(ckpts[name], *sampling, *lay)
        assert got == ref, f"{name} {lay}"
        assert "ranks: 2 ranks = " in out and "communication (rank 0" in out


def test_torchrun_generate_runs_one_rank_per_process(ckpts):
    """``torchrun`` sets RANK / WORLD_SIZE and hosts the store in its agent; the command has
    no --nproc (Qwen3: 2 pipeline stages by default)."""
    from llm_kernels.distributed.launch import free_port

    ref, _ = _generate(ckpts["qwen3-mini"], "--temperature", "0")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(free_port()), "-m", "llm_kernels", "generate", "--checkpoint", str(ckpts["qwen3-mini"]),
                        "--prompt-ids", PROMPT, "--max-new-tokens", "10", "--ignore-eos", "--threads", "1",
                        "--dtype", "float32", "--temperature", "0"], capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, TORCH_CPP_LOG_LEVEL="FATAL"))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("generated ids:")]
    assert lines == [f"generated ids: {','.join(map(str, ref))}"], r.stdout
    assert "2 ranks = 2 pipeline stages x 1 expert shard" in r.stdout


def test_unseeded_sampling_draws_alike_on_every_rank(ckpts):
    # no --seed: rank 0 draws one for all; ranks sampling apart would feed different tokens
    # and the expert shards' routing check would stop the run
    ids, _ = _generate(ckpts["mini"], "--temperature", "1.0", "--top-k", "0", "--top-p", "1", "--nproc", "2")
    assert len(ids) == 10


def test_generate_refuses_what_cannot_run_over_ranks(ckpts):
    r = _run("generate", "--checkpoint", str(ckpts["mini"]), "--nproc", "2", "--chat", timeout=60)
    assert r.returncode != 0 and "--chat" in r.stderr and "over ranks" in r.stderr, r.stderr
    r = _run("generate", "--checkpoint", str(ckpts["mini"]), "--nproc", "2", "--pp", "2", "--prompt-ids", "1,2",
             "--speculative", "mtp", timeout=60)
    assert r.returncode != 0 and "--speculative" in r.stderr and "pipeline stage" in r.stderr, r.stderr


def test_speculative_mtp_over_expert_shards(tmp_path):
    """The one-process ids and acceptance (seeded sampling: drafts accepted and rejected)."""
    ckpt = write_random_checkpoint(preset("mini", mtp_layers=1), tmp_path / "mtp", seed=5, dtype=torch.float32,
                                   progress=False)
    spec = ["--speculative", "mtp", "--temperature", "1.5", "--top-k", "0", "--top-p", "1", "--seed", "4"]
    ref, out1 = _generate(ckpt, *spec)
    got, out2 = _generate(ckpt, *spec, "--nproc", "2")
    assert got == ref
    spec_line = [ln for ln in out1.splitlines() if ln.startswith("speculative (mtp)")]
    assert spec_line and spec_line == [ln for ln in out2.splitlines() if ln.startswith("speculative (mtp)")]


def test_bench_over_ranks_reports_layout_bytes_and_communication(ckpts, tmp_path):
    out = tmp_path / "bench.json"
    r = _run("bench", "--checkpoint", str(ckpts["mini"]), "-p", "8", "-n", "4", "-r", "2", "--warmup", "1",
             "-t", "1", "--dtype", "float32", "--bandwidth", "10", "--json", str(out), "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks = 1 pipeline stage x 2 expert shards" in r.stdout
    assert r.stdout.count("| pp8") == 1 and r.stdout.count("| tg4") == 1  # one table: rank 0's
    data = json.loads(out.read_text())
    ranks = data["ranks"]
    assert ranks["world_size"] == 2 and ranks["pp"] == 1 and ranks["ep"] == 2
    assert len(ranks["bytes_per_token_per_rank"]) == 2 and all(b > 0 for b in ranks["bytes_per_token_per_rank"])
    assert data["bytes_per_token"] == sum(ranks["bytes_per_token_per_rank"])
    for row in data["tests"]:
        assert row["t_s_median"] > 0 and row["comm"]["ep_sent"] > 0 and row["comm"]["ep_s"] > 0
        if row["kind"] == "tg":
            assert row["weight_bytes_per_step"] > 0 and row["pct_roofline"] > 0
