"""Model-level benchmark (``python -m llm_kernels bench --checkpoint DIR -p P -n N``,
:mod:`llm_kernels.bench.model`) on tiny random checkpoints: the JSON holds every requested
test with positive t/s, bytes per token equal an independent count over the checkpoint's
tensors, % roofline follows from the reported numbers, bad input exits 2, the per-layer
mode is still what ``bench --preset`` runs. No timing asserts."""

from __future__ import annotations

import json

import pytest
import torch

from llm_kernels import models
from llm_kernels.bench import driver
from llm_kernels.bench import model as mb
from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint

FAST = ["-r", "2", "--bw-bytes", "64M", "--quiet"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_bench")
    out = {}
    for name in ("mini", "qwen3-mini"):
        out[name] = write_random_checkpoint(models.preset(name), root / name, seed=0, dtype=torch.float32,
                                            progress=False)
    return out


def _run(argv, tmp_path, capsys):
    path = tmp_path / "out.json"
    rc = driver.main([*argv, "--json", str(path)])
    cap = capsys.readouterr()
    return rc, (json.loads(path.read_text()) if path.exists() else None), cap


def test_mode_selection():
    assert mb.wants_model_mode(["--checkpoint", "X", "-p", "512"])
    assert mb.wants_model_mode(["-n128", "--model", "X"])
    assert mb.wants_model_mode(["--n-prompt=512"])
    assert mb.wants_model_mode(["-m", "X"])
    assert not mb.wants_model_mode(["--preset", "flash", "--context", "4096", "--batch", "1,4"])
    assert not mb.wants_model_mode(["--checkpoint", "X", "--tokens", "1,8"])


def test_plan_names():
    names = [t.name for t in mb.plan_tests([512], [128], [0, 4096], [1, 4])]
    assert names == ["pp512", "pp512 @ d4096", "tg128", "tg128 b4", "tg128 @ d4096", "tg128 @ d4096 b4"]


def _dense_count(ckpt, dtype):
    """Independent count: every tensor of the checkpoint at ``dtype`` read in full, except the
    embedding (one row per token); the 2-D part separately."""
    cfg, w = load_checkpoint(ckpt, dtype=dtype, progress=False)
    emb = w["model.embed_tokens.weight"]
    row = emb.element_size() * emb.shape[1]
    rest = [t for n, t in w.items() if n != "model.embed_tokens.weight"]
    mat = sum(t.numel() * t.element_size() for t in rest if t.dim() == 2)
    vec = sum(t.numel() * t.element_size() for t in rest if t.dim() < 2)
    head = w["lm_head.weight"] if not cfg.tie_word_embeddings else emb
    return cfg, row, mat, vec, head.numel() * head.element_size()


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_qwen3_dense_json(ckpts, tmp_path, capsys, backend):
    rc, d, cap = _run(["--checkpoint", str(ckpts["qwen3-mini"]), "-p", "8", "-n", "3", "-d", "0,5", "-b", "1,2",
                       "--backend", backend, "--dtype", "float32", *FAST], tmp_path, capsys)
    assert rc == 0, cap.err
    want = ["pp8", "pp8 @ d5", "tg3", "tg3 b2", "tg3 @ d5", "tg3 @ d5 b2"]
    assert [t["test"] for t in d["tests"]] == want
    for t in d["tests"]:
        assert len(t["t_s"]) == 2 and all(x > 0 for x in t["t_s"])
        assert t["t_s_median"] > 0 and t["t_s_min"] <= t["t_s_median"] <= t["t_s_max"]
        assert len(t["warmup_s"]) == 1
        assert t["test"] in cap.out  # the printed table
    # bytes per decoded token = an independent sum over the checkpoint's tensors
    cfg, row, mat, vec, head = _dense_count(ckpts["qwen3-mini"], torch.float32)
    assert not cfg.tie_word_embeddings and head > 0
    assert d["bytes_per_token"] == mat + vec + row
    assert d["bytes_breakdown"]["dense"] - d["bytes_breakdown"]["vectors"] == mat   # 2-D weights incl. the head
    assert d["bytes_breakdown"]["per_seq_rows"] == row
    assert d["bytes_breakdown"]["routed_per_token"] == 0
    # dense model: a b-sequence step reads the weights once (+ one embedding row per sequence)
    tg = {t["test"]: t for t in d["tests"] if t["kind"] == "tg"}
    assert tg["tg3"]["weight_bytes_per_step"] == d["bytes_per_token"]
    assert tg["tg3 b2"]["weight_bytes_per_step"] == mat + vec + 2 * row
    # % roofline = bytes per step x steps/s / the mean of the two probes
    bw = d["bandwidth_gbs"]
    assert bw == pytest.approx((d["bandwidth_gbs_before"] + d["bandwidth_gbs_after"]) / 2)
    for t in tg.values():
        steps_s = t["t_s_median"] / t["batch"]   # the reported median t/s, per sequence = steps/s
        assert t["pct_roofline"] == pytest.approx(100 * t["weight_bytes_per_step"] * steps_s / 1e9 / bw)
        assert t["effective_gbs"] == pytest.approx(t["weight_bytes_per_step"] * steps_s / 1e9)
        assert t["t_s"] == pytest.approx([t["tokens"] / s for s in t["runs_s"]])
    for t in d["tests"]:
        if t["kind"] == "pp":
            assert t["pct_roofline"] is None
    assert d["dispatch"]["path"] in ("vnni", "avx2", "fallback")
    assert d["cpu_tier"] == d["dispatch"]["tier"] and (d["cpu_tier"] == "plain") == (d["dispatch"]["path"] == "fallback")
    assert d["threads"]["torch"] >= 1 and d["threads"]["numba"] >= 1
    assert d["machine"]["dram_bandwidth_gbs"] == pytest.approx(bw)
    assert "CPU tier:" in cap.out and "first call" in cap.out


def test_deepseek_w8a8_moe(ckpts, tmp_path, capsys):
    rc, d, cap = _run(["--model", str(ckpts["mini"]), "-p", "6", "-n", "2", "-b", "1,3", "--quant", "w8a8",
                       "--backend", "fused", *FAST], tmp_path, capsys)
    assert rc == 0, cap.err
    assert [t["test"] for t in d["tests"]] == ["pp6", "tg2", "tg2 b3"]
    assert all(x > 0 for t in d["tests"] for x in t["t_s"])
    assert d["weights_quantized"] and d["model"].endswith("W8A8")
    rb = d["bytes_breakdown"]
    cfg = models.load_config(ckpts["mini"])
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    assert rb["experts_per_tok"] == k and rb["n_routed_experts"] == e
    assert len(rb["expert_bytes"]) == cfg.num_hidden_layers
    assert rb["routed_per_token"] == round(k * sum(rb["expert_bytes"].values()))
    assert d["bytes_per_token"] == round(rb["dense"] + rb["per_seq_rows"] + rb["routed_per_token"])
    # per token reads less than the whole model (E - k experts per layer are skipped)
    assert d["bytes_per_token"] < d["size_bytes"]
    b3 = d["tests"][2]
    assert b3["weight_bytes_per_step"] == round(rb["dense"] + 3 * rb["per_seq_rows"]
                                                + min(3 * k, e) * sum(rb["expert_bytes"].values()))
    # the INT8 GEMM peak is probed in the same run and the prefill row is set against it
    pp = d["tests"][0]
    assert d["int8_peak_gops"] > 0
    assert pp["gops"] == pytest.approx(2 * d["bytes_per_token"] * pp["t_s_median"] / 1e9)
    assert pp["pct_int8_peak"] == pytest.approx(100 * pp["gops"] / d["int8_peak_gops"])
    assert "of the INT8 GEMM peak measured in this run" in cap.out


def test_int8_scheme_label_and_fewer_bytes(ckpts, tmp_path, capsys):
    rc, d8, cap = _run(["--model", str(ckpts["mini"]), "-n", "2", "--quant", "w8a8", *FAST], tmp_path, capsys)
    assert rc == 0, cap.err
    rc, di, cap = _run(["--model", str(ckpts["mini"]), "-n", "2", "--quant", "int8", *FAST], tmp_path, capsys)
    assert rc == 0, cap.err
    assert di["model"].endswith("INT8") and d8["model"].endswith("W8A8")
    assert di["bytes_per_token"] < d8["bytes_per_token"]      # the head and the rest went INT8
    assert di["peak_rss_bytes"] >= di["end_rss_bytes"] > 0


def test_weight_storage_counts_packed_storage():
    """Prepared W8A8 weights count their packed storage (payload + scales + VNNI row sums),
    a pack shared by several weights once."""
    from llm_kernels.kernels.qwen3.prepare import prepare_weights
    from llm_kernels.numerics.quant import quantize_weight

    g = torch.Generator().manual_seed(0)
    ws = {f"model.layers.0.mlp.{n}.weight": quantize_weight(torch.randn(96, 64, generator=g))
          for n in ("gate_proj", "up_proj")}
    ws["model.layers.0.self_attn.q_proj.weight"] = torch.randn(8, 64)  # no full stage: stays as is
    prep = prepare_weights(ws, None)
    seen: set[int] = set()
    gate = mb.weight_storage(prep["model.layers.0.mlp.gate_proj.weight"], seen)
    up = mb.weight_storage(prep["model.layers.0.mlp.up_proj.weight"], seen)
    pk = prep["model.layers.0.mlp.gate_proj.weight"].packed
    assert up == 0 and gate == pk.data.nbytes + pk.scale.nbytes + (pk.wsum128.nbytes if pk.layout in ("vnni", "avx2") else 0)
    raw = ws["model.layers.0.mlp.gate_proj.weight"]
    assert mb.weight_storage(raw) == 96 * 64 + 96 * 4
    with pytest.raises(TypeError):
        mb.weight_storage(object())


@pytest.mark.parametrize("argv, msg", [
    (["--checkpoint", "/nonexistent/ckpt", "-p", "8"], "does not exist"),
    (["-p", "8"], "needs a checkpoint"),
    (["-p", "0"], "expected integers >= 1"),
    (["-n", "-3"], "expected integers >= 1"),
    (["-n", "4", "-d", "5000"], "max_position_embeddings"),
    (["-n", "4", "-d", "100", "-c", "50"], "more than the cache holds"),
    (["-p", "8", "-r", "0"], "repetitions"),
    (["-p", "8", "--backend", "nope"], "invalid choice"),
])
def test_errors_exit_2(ckpts, capsys, argv, msg):
    if "--checkpoint" not in argv and msg != "needs a checkpoint":
        argv = ["--checkpoint", str(ckpts["qwen3-mini"]), *argv]
    with pytest.raises(SystemExit) as ei:
        rc = driver.main(argv)
        raise SystemExit(rc)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and msg in err


def test_float_only_quant_none_on_w8a8_is_an_error(ckpts, tmp_path, capsys):
    from llm_kernels.checkpoint.writer import quantize_checkpoint

    q = quantize_checkpoint(ckpts["qwen3-mini"], tmp_path / "q8", progress=False)
    rc = driver.main(["--checkpoint", str(q), "-n", "2", "--quant", "none", *FAST])
    assert rc == 2
    assert "error:" in capsys.readouterr().err


def test_per_layer_mode_still_runs(tmp_path, capsys, monkeypatch):
    """Without -p/-n the driver is the per-layer benchmark (its own JSON, benchmark name)."""
    monkeypatch.chdir(tmp_path)
    rc = driver.main(["--preset", "qwen3-mini", "--hidden", "64", "--intermediate", "96", "--heads", "4",
                      "--kv-heads", "2", "--head-dim", "16", "--batch", "1", "--context", "8", "--repeats", "1", "--warmup", "1",
                      "--backends", "reference", "--quant", "none", "--no-transformers", "--bandwidth", "40",
                      "--quiet"])
    assert rc == 0
    files = list(tmp_path.glob("bench_*.json"))
    assert len(files) == 1 and files[0].name != mb.DEFAULT_JSON
    assert json.loads(files[0].read_text())["benchmark"] != "model"


def test_help_per_mode(capsys):
    with pytest.raises(SystemExit) as ei:
        driver.main(["-p", "8", "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "--n-prompt" in out and "--batch-size" in out and "Model-level" in out
