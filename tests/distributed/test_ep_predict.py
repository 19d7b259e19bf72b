"""The paper model of expert-parallel decode (llm_kernels.distributed.predict): its byte
counts equal a written checkpoint's tensor bytes (bf16 mini: every byte of the stored data,
dense and experts apart), the expected largest route count is exact where it is trivial,
the predicted combine bytes per step match the measured Flash-dims runs
(docs/distributed.md: 92.0 KiB at 2 ranks, 61.5 KiB at 4), and the command prints a table."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch

from llm_kernels.checkpoint import write_random_checkpoint
from llm_kernels.distributed.predict import byte_model, main, max_routes, predict
from llm_kernels.models import preset


def test_byte_model_equals_the_stored_bytes(tmp_path):
    cfg = preset("mini")
    d = write_random_checkpoint(cfg, tmp_path / "m", seed=0, dtype=torch.bfloat16, progress=False)
    stored = {"expert": 0, "dense": 0}
    for f in d.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            head = json.loads(fh.read(n))
        for name, v in head.items():
            if name != "__metadata__":
                key = "expert" if re.search(r"(^|\.)experts\.\d+\.", name) else "dense"
                stored[key] += v["data_offsets"][1] - v["data_offsets"][0]
    bm = byte_model(cfg, "none")
    assert (bm.dense, bm.expert * bm.E * bm.L) == (stored["dense"], stored["expert"])
    assert bm.dense_step == bm.dense - cfg.vocab_size * bm.embed_row
    q = byte_model(cfg, "w8a8")  # experts: 1 byte per weight + a float32 scale per row
    I, D = cfg.moe_intermediate_size, cfg.hidden_size
    assert q.expert == 3 * I * D + 4 * (2 * I + D)


def test_routes_and_flash_dims_combine_bytes():
    assert max_routes(3, 2, 8, 1) == 6.0  # one rank owns every route
    assert max_routes(1, 6, 16, 16) == 1.0  # one expert per rank, 6 distinct experts
    bm = byte_model(preset("flash", num_hidden_layers=3, n_routed_experts=16), "w8a8")
    for N, measured_kib in ((2, 92.0), (4, 61.5)):  # measured per decode step, T = 1
        r = predict(bm, N, 1, dram_gbs=16, link_gbps=10, latency_us=100)
        assert r["comm_bytes"] / 1024 == pytest.approx(measured_kib, rel=0.05)


def test_predict_command_prints_a_table(capsys):
    assert main(["--preset", "flash", "--hosts", "16,32", "--link-gbps", "25"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+32\s+1\s+1\s+25Gb\s+16\.\d\s+24,64,256 GB", out, re.M), out
    assert main(["--preset", "flash", "--hosts", "3"]) == 2
    assert "leave 3 expert shards per stage, which must divide n_routed_experts=256" in capsys.readouterr().err
    assert main(["--preset", "pro", "--hosts", "96", "--pp", "8", "--link-gbps", "25"]) == 0
    assert re.search(r"^\s+96\s+8\s+1\s+25Gb\s+21\.\d\s+24,64,256 GB", capsys.readouterr().out, re.M)


def test_pipeline_prediction_accounts_every_byte():
    """With one stage the pipeline model is the expert-parallel one (reads, memory); two
    stages of one shard hold half the layers each: the busiest rank reads and holds less
    than one of one stage x 2 shards."""
    from llm_kernels.distributed.predict import byte_model, predict, predict_pp
    from llm_kernels.models import preset

    bm = byte_model(preset("flash", num_hidden_layers=4, n_routed_experts=16), "int8")
    assert bm.layer_dense > 0 and bm.head > 0 and bm.embed > 0 and bm.hidden_row == 4 * 4 * 4096
    for N in (1, 2, 4):
        a, b = predict(bm, N, 1, 45.0, 25.0, 30.0), predict_pp(bm, N, 1, 1, 45.0, 25.0, 30.0)
        assert b["bytes_read"] == pytest.approx(a["bytes_read"], rel=1e-12)
        assert b["mem_gib"] == pytest.approx(a["mem_gib"], rel=1e-12)
    one, two = predict_pp(bm, 2, 1, 1, 45.0, 25.0, 0.0), predict_pp(bm, 2, 2, 1, 45.0, 25.0, 0.0)
    assert two["bytes_read"] < one["bytes_read"] and two["mem_gib"] < one["mem_gib"]
