"""Pipeline parallelism (layer ranges per stage) and expert x pipeline layouts: logits of
2 and 4 ranks are bitwise equal to one process (prefill + 3 decode steps, a batch of 2
sequences of different lengths) for DeepSeek-V4 (PP=2, PP=2 x EP=2) and Qwen3 (PP=2,
PP=4); the transfers carry exactly the hidden rows and logits the step needs; the
command line's layout rules; a stage's load holds only its layers; a rank killed
mid-decode is named. One thread per process (see test_expert_parallel)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint
from llm_kernels.distributed import spawn_local
from llm_kernels.distributed.layout import RankLayout, split_layers
from llm_kernels.models import get, preset

WORKER = Path(__file__).with_name("ep_worker.py")
INPUTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
DECODES = [[10, 11, 12], [13, 14, 15]]
ROWS = sum(map(len, INPUTS)) + sum(map(len, DECODES))  # rows through the pipeline: 10 + 3 x 2
DS_CONFIGS = [["float32", "reference", "none"], ["float32", "fused", "int8"], ["bfloat16", "fused", "w8a8"]]
QW_CONFIGS = [["float32", "reference", "none"], ["float32", "fused", "w8a8"], ["bfloat16", "fused", "int8"]]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pp")
    return {name: write_random_checkpoint(preset(name), root / name, seed=7, dtype=torch.float32, progress=False)
            for name in ("mini", "qwen3-mini")}


def _run(ckpt: Path, out: Path, configs, nproc: int, pp: int = 1, inputs=INPUTS, decodes=DECODES,
         env: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(WORKER), str(ckpt), str(out), json.dumps(configs), json.dumps(inputs),
           json.dumps(decodes)]
    if nproc == 1:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, **(env or {})))
        assert r.returncode == 0, r.stderr[-3000:]
    else:
        assert spawn_local([], nproc, command=cmd, env={"EP_WORKER_PP": str(pp), **(env or {})}) == 0


def _bitwise(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k].view(torch.int32), b[k].view(torch.int32))]


@pytest.mark.parametrize("model,configs,layouts", [
    ("mini", DS_CONFIGS, [(2, 2), (4, 2)]),  # PP=2; PP=2 x EP=2
    ("qwen3-mini", QW_CONFIGS, [(2, 2), (4, 4)]),
])
def test_pipeline_logits_bitwise_equal_single_process(ckpts, tmp_path, model, configs, layouts):
    cfg = preset(model)
    _run(ckpts[model], tmp_path / "one", configs, 1)
    for nproc, pp in layouts:
        out = tmp_path / f"{nproc}x{pp}"
        _run(ckpts[model], out, configs, nproc, pp)
        for i, c in enumerate(configs):
            ref, got = load_file(str(tmp_path / "one" / f"{i}.safetensors")), load_file(str(out / f"{i}.safetensors"))
            assert ref["decode.1"].shape == (3, cfg.vocab_size) and torch.isfinite(ref["decode.1"]).all()
            assert _bitwise(ref, got) == [], f"{model} {c}: {nproc} ranks, {pp} stages"
            pipe = json.loads((out / f"{i}.pipe.json").read_text())  # rank 0: stage 0
            # every row once, float32 (the layers' residual / HC stream at any dtype)
            row = getattr(cfg, "hc_mult", 1) * cfg.hidden_size * 4
            assert pipe["sent"] == ROWS * row and pipe["recv"] == 0
            assert pipe["logits"] == ROWS * cfg.vocab_size * 4  # float32 logits of every row
            assert pipe["calls"] == 2 * 4  # a send and a broadcast per step (prefill + 3 decode steps)
            assert (out / f"{i}.stats.json").exists() == (nproc > pp)  # expert combine only with shards


def test_cli_pp_writes_the_single_process_file(ckpts, tmp_path):
    base = ["logits", "--checkpoint", str(ckpts["qwen3-mini"]), "--threads", "1"]
    for x, d in zip(INPUTS, DECODES):
        base += ["--input-ids", ",".join(map(str, x)), "--decode-ids", ",".join(map(str, d))]
    outs = {}
    for extra in ([], ["--nproc", "2"]):  # a dense model: --pp defaults to the ranks
        out = tmp_path / f"q{len(extra)}.safetensors"
        r = subprocess.run([sys.executable, "-m", "llm_kernels", *base, "--out", str(out), *extra],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[len(extra)] = load_file(str(out))
    assert "2 ranks = 2 pipeline stages x 1 expert shard; layers [0, 2) | [2, 4)" in r.stdout
    assert re.search(r"pipeline, this rank, mean of 4 steps \(prefill included\): 2\.0 KiB hidden sent \+ 0\.0 KiB "
                     r"received, 8\.0 KiB logits, [0-9.]+ ms in transfers", r.stdout), \
        r.stdout  # rank 0: 16 rows of 128 float32 over 4 steps; 512 float32 logits per row
    assert "rank 1: stage 1 (layers [2, 4)), loaded" in r.stderr
    assert _bitwise(outs[0], outs[2]) == []


def test_layout_rules():
    assert split_layers(61, 4) == [(0, 16), (16, 31), (31, 46), (46, 61)]
    assert split_layers(3, 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match=r"pipeline stages must be in \[1, num_hidden_layers=3\], got 4"):
        split_layers(3, 4)
    lay = RankLayout(rank=5, world_size=8, pp=2, n_layers=4, n_experts=16)
    assert (lay.ep, lay.stage, lay.ep_rank, lay.layers) == (4, 1, 1, (2, 4))
    assert lay.stage_ranks(0) == [0, 1, 2, 3] and lay.peer(0) == 1 and lay.is_last_stage and not lay.is_first_stage
    with pytest.raises(ValueError, match="--pp 3 must divide the ranks"):
        RankLayout(0, 4, 3, 4, 8)
    with pytest.raises(ValueError, match="leave 3 expert shards per stage, which must divide n_routed_experts=8"):
        RankLayout(0, 3, 1, 4, 8)
    with pytest.raises(ValueError, match="no routed experts .*give --pp 4"):
        RankLayout(0, 4, 2, 4, 0)


def test_cli_refuses_bad_layouts(ckpts, tmp_path):
    from llm_kernels.cli import main

    def refused(ckpt, *extra) -> str:
        with pytest.raises(SystemExit) as e:
            main(["logits", "--checkpoint", str(ckpt), "--input-ids", "1,2", "--out", str(tmp_path / "x"), *extra])
        assert not (tmp_path / "x").exists()
        return str(e.value)

    assert "must divide n_routed_experts=8; shards per stage may be one of [1, 2, 4, 8]" in \
        refused(ckpts["mini"], "--nproc", "3")
    assert "pipeline stages must be in [1, num_hidden_layers=4], got 8" in \
        refused(ckpts["mini"], "--nproc", "8", "--pp", "8")
    assert "no routed experts (n_routed_experts); give --pp 2" in refused(ckpts["qwen3-mini"], "--nproc", "2", "--pp", "1")
    assert "--pp 2 needs as many ranks" in refused(ckpts["mini"], "--pp", "2")
    assert "--pp must be >= 1" in refused(ckpts["mini"], "--nproc", "2", "--pp", "-1")


def test_stage_load_holds_its_layers_only(ckpts):
    """What a stage's load predicate keeps: its layers, the embedding on the first stage,
    the head (and DeepSeek-V4's norm / hc_head) on the last; a tied Qwen3 embedding is on both."""
    part = get("deepseek_v4").pipeline_part
    assert [part(n) for n in ("layers.12.ffn.experts.3.w1.weight", "embed.weight", "head.weight", "norm.weight",
                              "hc_head_fn", "mtp.0.e_proj.weight")] == [12, "embed", "head", "head", "head", "head"]
    qpart = get("qwen3").pipeline_part
    tied = SimpleNamespace(tie_word_embeddings=True)
    assert qpart("model.layers.3.mlp.up_proj.weight_scale") == 3 and qpart("lm_head.weight") == "head"
    assert qpart("model.embed_tokens.weight") == "embed" and qpart("model.embed_tokens.weight", tied) == "embed_head"
    assert qpart("model.norm.weight") == "head"

    from llm_kernels.distributed.runner import RankContext

    class _Group:  # RankContext reads only rank / world_size before wrap()
        rank, world_size = 1, 2

    ctx = RankContext(_Group(), RankLayout(1, 2, 2, 4, 0))
    cfg, w = ctx.load(ckpts["qwen3-mini"], torch.float32, None)
    _, full = load_checkpoint(ckpts["qwen3-mini"], dtype=torch.float32, progress=False)
    want = {n for n in full if n.startswith(("model.layers.2.", "model.layers.3.", "model.norm.", "lm_head."))}
    assert set(w) == want and ctx.engine_kwargs() == {"layers": (2, 4)}
    assert ctx.loaded_bytes == sum(full[n].numel() * full[n].element_size() for n in want)


def test_killed_stage_is_named(ckpts, tmp_path):
    """``LLM_KERNELS_EP_FAULT=1:3:kill``: stage 1 (rank 1) kills itself at its 3rd transfer
    (the first decode step's receive); rank 0 names it and no file is written."""
    out = tmp_path / "k.safetensors"
    args = ["logits", "--checkpoint", str(ckpts["qwen3-mini"]), "--threads", "1", "--out", str(out),
            "--nproc", "2", "--ep-timeout", "60"]
    for x, d in zip(INPUTS, DECODES):
        args += ["--input-ids", ",".join(map(str, x)), "--decode-ids", ",".join(map(str, d))]
    r = subprocess.run([sys.executable, "-m", "llm_kernels", *args], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, LLM_KERNELS_EP_FAULT="1:3:kill"))
    assert r.returncode == 1, r.stderr[-3000:]
    m = re.search(r"error: rank 0: (sending the hidden rows to rank 1|broadcasting the logits from rank 1).* failed "
                  r"\(after ([0-9.]+) s, timeout 60 s\): rank 1 stopped answering", r.stderr)
    assert m and float(m.group(2)) < 30, r.stderr[-3000:]
    assert "rank 1 was killed by SIGKILL; the run of 2 ranks was aborted" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


def test_pipelined_chunked_prefill_equals_one_process(ckpts, tmp_path):
    """A prefill of 10 rows in chunks of 3 (``-ub 3``: 4 chunks, their logits broadcast once
    after the last) over 2 stages gives the one-process logits of the same chunking; INT8
    is bitwise the unchunked result too."""
    base = ["logits", "--checkpoint", str(ckpts["mini"]), "--threads", "1", "--backend", "fused", "--quant", "int8"]
    for x, d in zip(INPUTS, DECODES):
        base += ["--input-ids", ",".join(map(str, x)), "--decode-ids", ",".join(map(str, d))]
    outs = {}
    for name, extra in (("whole", []), ("one", ["-ub", "3"]), ("pp", ["-ub", "3", "--nproc", "2", "--pp", "2"])):
        out = tmp_path / f"{name}.safetensors"
        r = subprocess.run([sys.executable, "-m", "llm_kernels", *base, "--out", str(out), *extra],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = load_file(str(out))
    # rank 0 sent the 16 rows once; 4 prefill chunks + 3 decode steps, one broadcast per step
    assert re.search(r"mean of 4 steps \(prefill included\): 8\.0 KiB hidden sent", r.stdout), r.stdout
    assert _bitwise(outs["one"], outs["pp"]) == [] and _bitwise(outs["whole"], outs["pp"]) == []


@pytest.mark.parametrize("model,nproc,pp", [("qwen3-mini", 2, 2), ("mini", 4, 2)])
def test_steps_in_flight_equal_one_process(ckpts, tmp_path, model, nproc, pp):
    """Two sequence groups whose decode steps stay in flight together (``engine.submit``:
    stage 0 runs one group while stage 1 runs the other) give the logits of the same
    groups stepped one after another in one process, bitwise."""
    inputs = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [4, 4], [5, 6, 7, 8]]
    decodes = [[10, 11, 12, 13], [13, 14, 15, 16], [3, 2, 1, 0], [7, 7, 7, 7]]
    configs = [["float32", "fused", "int8"], ["bfloat16", "reference", "none"]]
    env = {"EP_WORKER_GROUPS": "2"}
    _run(ckpts[model], tmp_path / "one", configs, 1, inputs=inputs, decodes=decodes, env=env)
    _run(ckpts[model], tmp_path / "pp", configs, nproc, pp, inputs=inputs, decodes=decodes, env=env)
    for i, c in enumerate(configs):
        ref, got = load_file(str(tmp_path / "one" / f"{i}.safetensors")), load_file(str(tmp_path / "pp" / f"{i}.safetensors"))
        assert ref["decode.3"].shape == (4, preset(model).vocab_size)
        assert _bitwise(ref, got) == [], f"{model} {c}"
        pipe = json.loads((tmp_path / "pp" / f"{i}.pipe.json").read_text())
        assert pipe["calls"] == 2 + 2 * 4 * 2  # prefill: send + broadcast; 8 submitted steps: send + broadcast
