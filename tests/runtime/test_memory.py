"""Process memory helpers (``llm_kernels.runtime.memory``) and the loader's memory contract:
no tensor returned by ``load_checkpoint`` keeps the safetensors file mapped."""

from __future__ import annotations

import gc
import mmap
import sys

import pytest
import torch

from llm_kernels.runtime import memory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc (any CPU tier)")


@linux
def test_rss_reports_bytes_and_sees_an_allocation():
    before = memory.rss()
    assert before["rss"] > 0 and before["peak"] >= before["rss"]
    # 64 MiB of fresh anonymous pages, touched: an allocator's heap could hand back pages that
    # are already resident (seen after other tests in one process), a new mapping cannot
    buf = mmap.mmap(-1, 64 << 20)
    buf.write(b"\x01" * (64 << 20))
    after = memory.rss()
    assert after["rss"] - before["rss"] > 48 << 20
    buf.close()


@linux
def test_prompt_release_and_trim_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("needs glibc (any CPU tier)")
    assert memory.prompt_release() is True
    x = torch.ones(256 << 20, dtype=torch.uint8)
    mid = memory.rss()["rss"]
    del x
    gc.collect()
    memory.trim()
    assert mid - memory.rss()["rss"] > 200 << 20      # the block went back to the OS


def _mapped_rss(path_part: str) -> int:
    total, cur = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                cur = head[5] if len(head) > 5 else ""
            elif line.startswith("Rss:") and cur and path_part in cur:
                total += int(head[1]) * 1024
    return total


@linux
@pytest.mark.parametrize("quant", [None, "int8"])
def test_loaded_tensors_do_not_keep_the_file_mapped(tmp_path, quant):
    from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint
    from llm_kernels.models import preset

    d = tmp_path / "ck"
    write_random_checkpoint(preset("mini"), d, seed=0, dtype=torch.bfloat16, progress=False)
    cfg, w = load_checkpoint(d, dtype=torch.bfloat16, quant=quant, progress=False)
    gc.collect()
    assert w and _mapped_rss(str(d)) == 0
