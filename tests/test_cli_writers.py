"""CLI of the checkpoint writers (``quantize``, ``make-checkpoint``): every refusal is exit code
2 with a message naming the paths / flag and nothing written; ``--force``,
``--max-shard-size`` and ``--format`` work end to end."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from llm_kernels import cli
from llm_kernels.checkpoint import load_checkpoint


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("cliw") / "mini"
    assert cli.main(["make-checkpoint", "--preset", "mini", "--out", str(out)]) == 0
    return out


def test_quantize_onto_its_source_exits_non_zero(ckpt):
    """The new user's report: ``quantize --checkpoint X --out X`` exited 0 and replaced X."""
    before = _digest(ckpt)
    r = subprocess.run([sys.executable, "-m", "llm_kernels", "quantize", "--checkpoint", str(ckpt), "--out",
                        str(ckpt), "--force"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "is the source checkpoint" in r.stderr and str(ckpt) in r.stderr
    assert _digest(ckpt) == before


@pytest.mark.parametrize("sub", ["lies inside", "contains"])
def test_quantize_inside_or_containing_the_source(ckpt, capsys, sub):
    out = ckpt / "q" if sub == "lies inside" else ckpt.parent
    assert cli.main(["quantize", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{sub} the source checkpoint" in err and str(ckpt) in err and str(out) in err
    assert not (ckpt / "q").exists()


def test_non_empty_out_and_force(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["make-checkpoint", "--preset", "qwen3-mini", "--max-shard-size", "300KB",
                     "--out", str(out)]) == 0
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    before = _digest(out)
    for cmd in (["quantize", "--checkpoint", str(ckpt)], ["make-checkpoint", "--preset", "mini"]):
        assert cli.main([*cmd, "--out", str(out)]) == 2
        assert "is not empty" in capsys.readouterr().err and _digest(out) == before
    assert cli.main(["quantize", "--checkpoint", str(ckpt), "--scheme", "int8_g32", "--out", str(out), "--force"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and not any(n.startswith("model-") for n in names)
    assert "model.safetensors.index.json" not in names
    cfg, w = load_checkpoint(out, progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "llm_kernels_int8_g32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]       # no staging folder left


def test_max_shard_size_and_format_flags(ckpt, tmp_path, capsys):
    q = tmp_path / "q"
    assert cli.main(["quantize", "--checkpoint", str(ckpt), "--max-shard-size", "0.2MB", "--out", str(q)]) == 0
    index = json.loads((q / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert cli.main(["quantize", "--checkpoint", str(ckpt), "--format", "release", "--out", str(tmp_path / "r")]) == 0
    assert "wrote release-format checkpoint" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert cli.main(["quantize", "--checkpoint", str(tmp_path / "r"), "--scheme", "int8", "--out",
                     str(tmp_path / "ri")]) == 0
    load_checkpoint(tmp_path / "ri", progress=False)
    with pytest.raises(SystemExit, match="--scheme applies to --format int8"):
        cli.main(["quantize", "--checkpoint", str(ckpt), "--format", "release", "--scheme", "int8",
                  "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as e:
        cli.main(["make-checkpoint", "--preset", "mini", "--max-shard-size", "5 bananas", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "--max-shard-size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_disk_error_is_a_clear_error_and_leaves_out_alone(ckpt, tmp_path, monkeypatch, capsys):
    from llm_kernels.checkpoint import shards

    def full(self, name, tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards.ShardWriter, "add", full)
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--checkpoint", str(ckpt), "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "writing --out" in err and "No space left" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("preset", ["mini", "qwen3-mini"])
def test_release_checkpoint_generates_and_dequantizes(preset, tmp_path, capsys):
    """Issue 11's acceptance: ``make-checkpoint --format release`` then ``generate`` on it (the
    native path: FP8 -> int8_g32, MXFP4 kept 4-bit), and ``logits --quant none --dtype
    float32`` equal to the float checkpoint of the dequantized weights run the same way."""
    import torch
    from safetensors.torch import load_file, save_file

    rel = tmp_path / "rel"
    assert cli.main(["make-checkpoint", "--preset", preset, "--format", "release", "--out", str(rel)]) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--checkpoint", str(rel), "--prompt", "Once upon", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "release (FP8 -> int8_g32" in out and "generated ids:" in out
    # the float checkpoint of the dequantized weights
    cfg, deq = load_checkpoint(rel, dtype=torch.float32, quant="none", progress=False)
    flt = tmp_path / "flt"
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    args = ["--input-ids", "1,2,3,4", "--decode-ids", "5", "--dtype", "float32", "--backend", "reference"]
    assert cli.main(["logits", "--checkpoint", str(rel), "--quant", "none", *args, "--out", str(a)]) == 0
    flt.mkdir()
    save_file({k: v.contiguous() for k, v in deq.items()}, str(flt / "model.safetensors"))
    conf = json.loads((rel / "config.json").read_text())
    conf.pop("quantization_config")
    (flt / "config.json").write_text(json.dumps(conf))
    assert cli.main(["logits", "--checkpoint", str(flt), *args, "--out", str(b)]) == 0
    la, lb = load_file(str(a)), load_file(str(b))
    assert set(la) == set(lb) and all(torch.equal(la[k], lb[k]) for k in la)
