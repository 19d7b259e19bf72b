"""The checkpoint writers' output-folder safety (issue 11 item 5, "a safe quantize"):

* ``quantize`` refuses an output that is the source, inside it or contains it (symlinks
  resolved), names both paths and writes nothing;
* every writer refuses a non-empty output unless ``force``; with ``force`` a sharded
  checkpoint is replaced completely, and only once the new one is complete;
* a failure mid-write leaves the old checkpoint intact and no staging folder behind;
* sharded output (``shard_size_bytes``) loads back equal to the single-file output, tensor
  by tensor; the tokenizer / generation files travel with ``quantize``;
* the default-checkpoint cache replaces an interrupted older write.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llm_kernels.checkpoint import defaults, load_checkpoint, write_random_checkpoint
from llm_kernels.checkpoint import output_dir as od
from llm_kernels.checkpoint import shards as shards_mod
from llm_kernels.checkpoint.writer import SIDE_FILES, quantize_checkpoint
from llm_kernels.errors import CheckpointError, OutputDirError
from llm_kernels.models import preset
from llm_kernels.numerics.quant import QuantWeight

INDEX = "model.safetensors.index.json"
ST = "model.safetensors"


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    """Staging / parked folders the writers may have left next to their output."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A bf16 mini checkpoint with extra tokenizer side files (read-only)."""
    d = write_random_checkpoint(preset("mini"), tmp_path_factory.mktemp("src") / "float", seed=0, progress=False)
    for name, text in (("vocab.json", '{"a": 0}'), ("merges.txt", "#version: 0.2\na b\n"),
                       ("chat_template.jinja", "{{ messages }}"), ("special_tokens_map.json", "{}")):
        (d / name).write_text(text)
    return d


# ------------------------------------------------------------------ refusals (nothing written)
@pytest.mark.parametrize("where", ["same", "symlink", "inside", "containing"])
def test_quantize_refuses_source_overlap(src, tmp_path, where):
    before = _digest(src)
    if where == "same":
        out, want = src, "is the source"
    elif where == "symlink":
        out = tmp_path / "link"
        out.symlink_to(src)
        want = "is the source"
    elif where == "inside":
        out, want = src / "int8", "inside the source"
    else:
        out, want = src.parent, "contains the source"
    with pytest.raises(OutputDirError, match=want) as e:
        quantize_checkpoint(src, out, progress=False, force=True)   # force does not lift it
    assert str(src) in str(e.value) and str(out) in str(e.value)
    assert _digest(src) == before and not (src / "int8").exists()
    assert _leftovers(src.parent) == [] and _leftovers(tmp_path) == []


def test_quantize_refuses_source_given_through_a_symlink(src, tmp_path):
    link = tmp_path / "src-link"
    link.symlink_to(src)
    with pytest.raises(OutputDirError, match="is the source"):
        quantize_checkpoint(link, src, progress=False)


@pytest.mark.parametrize("writer", ["quantize", "random"])
def test_non_empty_output_refused_without_force(src, tmp_path, writer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty.*--force"):
        if writer == "quantize":
            quantize_checkpoint(src, out, progress=False)
        else:
            write_random_checkpoint(preset("mini"), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and _leftovers(tmp_path) == []


def test_empty_existing_folder_and_a_file_path(src, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    quantize_checkpoint(src, out, progress=False)                  # an empty folder is fine
    assert (out / ST).is_file()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputDirError, match="not a folder"):
        write_random_checkpoint(preset("mini"), f, progress=False, force=True)


def test_force_never_replaces_home_or_the_working_directory(tmp_path, monkeypatch):
    work = tmp_path / "proj" / "sub"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for out in (tmp_path / "proj", work, Path("."), Path.home(), Path("/")):
        for force in (False, True):
            with pytest.raises(OutputDirError, match="even with --force"):
                od.check_output_dir(out, force=force)
    od.check_output_dir(tmp_path / "proj" / "other", force=True)     # a sibling is fine


# ------------------------------------------------------------------ --force replaces completely
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_force_replaces_a_sharded_checkpoint_completely(src, tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(od, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    write_random_checkpoint(preset("mini"), out, seed=1, shard_size_bytes=300_000, progress=False)
    assert (out / INDEX).is_file() and len(list(out.glob("model-*-of-*.safetensors"))) > 2
    (out / "stale-notes.txt").write_text("old")
    quantize_checkpoint(src, out, progress=False, scheme="int8", force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", ST, "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "vocab.json", "merges.txt", "chat_template.jinja", "special_tokens_map.json"])
    cfg, w = load_checkpoint(out, progress=False)
    assert isinstance(w["head.weight"], QuantWeight)
    assert _leftovers(tmp_path) == []


def test_failure_mid_write_keeps_the_old_checkpoint(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_random_checkpoint(preset("mini"), out, seed=1, shard_size_bytes=300_000, progress=False)
    before = _digest(out)
    real_add, calls = shards_mod.ShardWriter.add, []

    def failing_add(self, name, tensor):
        calls.append(name)
        if len(calls) == 40:  # several shards into the new checkpoint
            raise OSError("simulated disk full")
        real_add(self, name, tensor)

    monkeypatch.setattr(shards_mod.ShardWriter, "add", failing_add)
    for run in (lambda: quantize_checkpoint(src, out, progress=False, force=True, shard_size_bytes=200_000),
                lambda: write_random_checkpoint(preset("mini"), out, seed=2, force=True, progress=False)):
        calls.clear()
        with pytest.raises(OSError, match="simulated disk full"):
            run()
        assert len(calls) == 40
        assert _digest(out) == before and _leftovers(tmp_path) == []
    calls.clear()
    with pytest.raises(OSError, match="simulated disk full"):   # a new folder is not created at all
        quantize_checkpoint(src, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path) == []


def test_bad_source_writes_nothing(src, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    with safe_open(str(src / ST), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys() if k != "embed.weight"}
    t["head.weight"][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(t, str(bad / ST))
    with pytest.raises(CheckpointError, match="embed.weight"):
        quantize_checkpoint(bad, tmp_path / "q", progress=False)
    t["embed.weight"] = torch.zeros(512, 128, dtype=torch.bfloat16)
    save_file(t, str(bad / ST))
    with pytest.raises(CheckpointError, match="head.weight.*NaN"):
        quantize_checkpoint(bad, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------ sharding and side files
@pytest.mark.parametrize("scheme", ["w8a8", "int8_g32"])
def test_sharded_quantize_equals_single_file(src, tmp_path, scheme):
    one = quantize_checkpoint(src, tmp_path / "one", progress=False, scheme=scheme)
    limit = 150_000
    many = quantize_checkpoint(src, tmp_path / "many", progress=False, scheme=scheme, shard_size_bytes=limit)
    assert sorted(p.name for p in one.glob("*.safetensors")) == [ST]
    index = json.loads((many / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and not (many / ST).exists()
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    total = 0
    for f in files:
        with safe_open(str(many / f), framework="pt") as h:
            sizes = [h.get_tensor(k).nbytes for k in h.keys()]
        assert sum(sizes) <= limit or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total == (one / ST).stat().st_size - _header_len(one / ST)
    cfg, a = load_checkpoint(one, progress=False)
    _, b = load_checkpoint(many, progress=False)
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert torch.equal(a[k].qweight, b[k].qweight) and torch.equal(a[k].scale, b[k].scale), k
    assert json.loads((one / "config.json").read_text()) == json.loads((many / "config.json").read_text())


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_quantize_equals_quantizing_on_load(src, tmp_path):
    """The streamed writer stores exactly what quantising the loaded float model gives."""
    from llm_kernels.checkpoint.quantized import quantize_weights

    out = quantize_checkpoint(src, tmp_path / "q", progress=False, scheme="int8", shard_size_bytes=10**6)
    cfg, f = load_checkpoint(src, progress=False)
    want = quantize_weights(f, cfg, scheme="int8")
    _, got = load_checkpoint(out, progress=False)
    assert list(got) == list(want)
    for k, w in want.items():
        if isinstance(w, QuantWeight):
            assert torch.equal(got[k].qweight, w.qweight) and torch.equal(got[k].scale, w.scale), k
        else:
            assert got[k].dtype == w.dtype and torch.equal(got[k], w), k


def test_side_files_copied(src, tmp_path):
    out = quantize_checkpoint(src, tmp_path / "q", progress=False)
    present = [n for n in SIDE_FILES if (src / n).is_file()]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "vocab.json", "merges.txt",
            "chat_template.jinja", "special_tokens_map.json"} <= set(present)
    for n in present:
        assert (out / n).read_bytes() == (src / n).read_bytes(), n
    conf = json.loads((out / "config.json").read_text())
    assert conf["quantization_config"]["quant_method"] == "llm_kernels_w8a8"
    assert {k: v for k, v in conf.items() if k != "quantization_config"} == json.loads((src / "config.json").read_text())


def test_parse_size():
    p = shards_mod.parse_size
    assert p("5GB") == 5 * 10**9 and p("500MB") == 5 * 10**8 and p("2GiB") == 2 * 2**30 and p("123") == 123
    assert p(" 1.5 kb ") == 1500 and p(7) == 7
    for bad in ("5 GBs", "-1", "0", "", "GB"):
        with pytest.raises(ValueError, match="--max-shard-size"):
            p(bad)


def test_atomic_write_uses_unique_names(tmp_path):
    f = tmp_path / "config.json"
    names = {od.unique_sibling(f).name for _ in range(50)}
    assert len(names) == 50 and all(n.startswith(f".config.json.tmp-{os.getpid()}-") for n in names)
    od.atomic_write_text(f, "{}\n")
    assert f.read_text() == "{}\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


# ------------------------------------------------------------------ the default cache
def test_default_checkpoint_replaces_an_interrupted_write(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_KERNELS_CACHE", str(tmp_path))
    out = defaults.cache_root() / f"qwen3-mini-seed0-float32-w{defaults.WRITER_VERSION}"
    out.mkdir(parents=True)
    (out / "model-00001-of-00002.safetensors").write_bytes(b"half")   # no config.json: unfinished
    got = defaults.default_checkpoint("qwen3-mini", dtype=torch.float32, progress=False)
    assert got == out and (out / "config.json").is_file() and not (out / "model-00001-of-00002.safetensors").exists()
    load_checkpoint(out, progress=False)
    assert _leftovers(tmp_path) == []


def test_default_checkpoint_written_meanwhile_by_another_process(monkeypatch, tmp_path):
    """Two processes writing the cache at once: the one that finishes second uses the first's."""
    monkeypatch.setenv("LLM_KERNELS_CACHE", str(tmp_path))
    out = tmp_path / f"qwen3-mini-seed0-float32-w{defaults.WRITER_VERSION}"
    real = od._commit

    def racing_commit(staged, target, force, o, flag):
        if target.name == "other":
            return real(staged, target, force, o, flag)
        write_random_checkpoint(preset("qwen3-mini"), tmp_path / "other", dtype=torch.float32, progress=False)
        os.rename(tmp_path / "other", target)     # the other process wins the race
        return real(staged, target, force, o, flag)

    monkeypatch.setattr(od, "_commit", racing_commit)
    assert defaults.default_checkpoint("qwen3-mini", dtype=torch.float32, progress=False) == out
    load_checkpoint(out, progress=False)
    assert _leftovers(tmp_path) == []
