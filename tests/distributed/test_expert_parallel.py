"""Expert parallelism (llm_kernels.distributed): logits of 2 and 4 ranks are bitwise equal
to one process (prefill + 3 decode steps, a batch of 2 sequences of different lengths) on
the float32 reference, the fused W8A8 and INT8 paths and the fused bf16 W8A8 path;
``logits --nproc 2`` writes the same file as one process; the sharded load, ownership and
fault-injection parsing. Every process runs one thread (the float32 GEMMs' results depend
on the thread count; the ranks replicate the dense part, so they must agree)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint
from llm_kernels.distributed import EXPERT_NAME, ExpertShard, RemoteExpert, spawn_local
from llm_kernels.distributed.digest import checkpoint_digest
from llm_kernels.distributed.expert_parallel import parse_fault
from llm_kernels.models import preset

WORKER = Path(__file__).with_name("ep_worker.py")
INPUTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
DECODES = [[10, 11, 12], [13, 14, 15]]
#: (dtype, backend, quant): the float32 reference, the fused INT8 paths, the bf16 wire.
CONFIGS = [["float32", "reference", "none"], ["float32", "fused", "w8a8"], ["float32", "fused", "int8"],
           ["bfloat16", "fused", "w8a8"]]


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    return write_random_checkpoint(preset("mini"), tmp_path_factory.mktemp("ep") / "mini", seed=3,
                                   dtype=torch.float32, progress=False)


def _run_worker(ckpt: Path, out: Path, nproc: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(WORKER), str(ckpt), str(out), json.dumps(CONFIGS), json.dumps(INPUTS),
           json.dumps(DECODES)]
    if nproc == 1:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    else:
        assert spawn_local([], nproc, command=cmd) == 0


@pytest.fixture(scope="module")
def single(mini, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    _run_worker(mini, out, 1)
    return out


def _bitwise(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ in any bit (or shape)."""
    assert a.keys() == b.keys()
    return [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k].view(torch.int32), b[k].view(torch.int32))]


@pytest.mark.parametrize("nproc", [2, 4])
def test_ep_logits_bitwise_equal_single_process(mini, single, tmp_path, nproc):
    _run_worker(mini, tmp_path, nproc)
    for i, cfg in enumerate(CONFIGS):
        ref, got = load_file(str(single / f"{i}.safetensors")), load_file(str(tmp_path / f"{i}.safetensors"))
        assert set(ref) == {"prefill.0", "prefill.1", "decode.0", "decode.1"}
        assert ref["decode.0"].shape == (3, 512) and torch.isfinite(ref["decode.0"]).all()
        assert _bitwise(ref, got) == [], f"{cfg} with {nproc} ranks"
        log = json.loads((tmp_path / f"{i}.stats.json").read_text())
        L = preset("mini").num_hidden_layers
        assert len(log) == L * (1 + 3)  # one combine per layer: prefill + 3 decode steps
        esz = 2 if cfg[0] == "bfloat16" else 4
        for T, sent, recv, sec, wait in log:
            assert (sent - 16) % (128 * esz) == 0 and recv == sent * (nproc - 1) and sec >= 0 and wait == 0


def test_cli_nproc_writes_the_single_process_file(mini, single, tmp_path):
    out = tmp_path / "ep2.safetensors"
    args = ["logits", "--checkpoint", str(mini), "--backend", "fused", "--quant", "w8a8", "--threads", "1",
            "--out", str(out), "--nproc", "2"]
    for x, d in zip(INPUTS, DECODES):
        args += ["--input-ids", ",".join(map(str, x)), "--decode-ids", ",".join(map(str, d))]
    r = subprocess.run([sys.executable, "-m", "llm_kernels", *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks = 1 pipeline stage x 2 expert shards; layers [0, 4)" in r.stdout and f"wrote {out}" in r.stdout
    assert "rank 1: experts [4, 8) of 8" in r.stderr
    got = load_file(str(out))
    ref = load_file(str(single / "1.safetensors"))  # the same configuration in one process
    ref = {k.replace("prefill.", "prefill_logits.").replace("decode.", "decode_logits."): v for k, v in ref.items()}
    assert _bitwise(ref, got) == []
    assert not list(tmp_path.glob(".*partial"))


def test_torchrun_runs_one_rank_per_process(mini, single, tmp_path):
    """``torchrun`` sets RANK / WORLD_SIZE and hosts the store in its agent: the plain command
    (no --nproc) runs as one rank per process and writes the one-process file."""
    from llm_kernels.distributed.launch import free_port

    out = tmp_path / "tr.safetensors"
    args = ["logits", "--checkpoint", str(mini), "--threads", "1", "--out", str(out)]
    for x, d in zip(INPUTS, DECODES):
        args += ["--input-ids", ",".join(map(str, x)), "--decode-ids", ",".join(map(str, d))]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(free_port()), "-m", "llm_kernels", *args], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, TORCH_CPP_LOG_LEVEL="FATAL"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks = 1 pipeline stage x 2 expert shards" in r.stdout and "rank 1: experts [4, 8) of 8" in r.stderr
    ref = load_file(str(single / "0.safetensors"))  # float32 reference, one process
    ref = {k.replace("prefill.", "prefill_logits.").replace("decode.", "decode_logits."): v for k, v in ref.items()}
    assert _bitwise(ref, load_file(str(out))) == []


def test_nproc_needs_experts_it_can_divide(mini, tmp_path):
    from llm_kernels.cli import main

    with pytest.raises(SystemExit) as e:
        main(["logits", "--checkpoint", str(mini), "--input-ids", "1,2", "--out", str(tmp_path / "x"),
              "--nproc", "3"])
    assert "leave 3 expert shards per stage, which must divide n_routed_experts=8; shards per stage may be one " \
        "of [1, 2, 4, 8]" in str(e.value)
    assert not (tmp_path / "x").exists()
    dense = write_random_checkpoint(preset("qwen3-mini"), tmp_path / "q3", seed=0, progress=False)
    with pytest.raises(SystemExit) as e:
        main(["logits", "--checkpoint", str(dense), "--input-ids", "1,2", "--out", str(tmp_path / "x"),
              "--nproc", "2", "--pp", "1"])
    assert "this model has no routed experts (n_routed_experts); give --pp 2" in str(e.value)


def test_sharded_load_keeps_only_the_local_experts(mini):
    shard = ExpertShard(8, 4, 1)
    rejected: set[str] = set()
    cfg, w = load_checkpoint(mini, dtype=torch.float32, progress=False, quant="w8a8", select=shard.select(rejected))
    _, full = load_checkpoint(mini, dtype=torch.float32, progress=False, quant="w8a8")
    experts = {n for n in full if EXPERT_NAME.search(n)}
    local = {n for n in experts if int(EXPERT_NAME.search(n).group(1)) in (2, 3)}
    assert set(w) == set(full) - experts | local
    assert any("shared_experts" in n for n in w)  # replicated: not a routed expert
    ph = shard.placeholders(rejected)
    assert set(ph) == experts - local and all(isinstance(p, RemoteExpert) for p in ph.values())
    assert {p.rank for p in ph.values()} == {0, 2, 3}
    with pytest.raises(RuntimeError, match="not loaded on this rank"):
        next(iter(ph.values())).shape


def test_expert_shard_and_fault_spec_errors():
    s = ExpertShard(16, 4, 2)
    assert (s.first, s.per_rank, s.owner(15), s.is_local(8), s.is_local(12)) == (8, 4, 3, True, False)
    with pytest.raises(ValueError, match="n_routed_experts=6, ranks=4; use one of \\[1, 2, 3, 6\\]"):
        ExpertShard(6, 4, 0)
    with pytest.raises(ValueError, match="rank must lie in \\[0, 2\\)"):
        ExpertShard(8, 2, 2)
    with pytest.raises(ValueError, match="routed experts: n_routed_experts=0"):
        ExpertShard(0, 2, 0)
    assert parse_fault("1:6:kill") == (1, 6, "kill") and parse_fault("") is None
    assert parse_fault("2:0:sleep8") == (2, 0, "sleep8")
    for bad in ("1:-1:kill", "x:1:kill", "1:2:pause", "1:2", "1:2:sleep"):
        with pytest.raises(ValueError, match="LLM_KERNELS_EP_FAULT must be"):
            parse_fault(bad)
    assert EXPERT_NAME.search("layers.0.ffn.shared_experts.w1.weight") is None
    assert EXPERT_NAME.search("layers.0.ffn.experts.12.w2.weight_scale").group(1) == "12"


def test_checkpoint_digest_tells_seeds_apart(mini, tmp_path):
    other = write_random_checkpoint(preset("mini"), tmp_path / "other", seed=4, dtype=torch.float32, progress=False)
    assert checkpoint_digest(mini) == checkpoint_digest(mini)
    assert checkpoint_digest(mini) != checkpoint_digest(other)
