"""The shipped golden cases run, pass, and replay from frozen data without the golden."""

from __future__ import annotations

import torch

from llm_kernels.checkpoint import write_random_checkpoint
from llm_kernels.models import preset
from llm_kernels.models.deepseek_v4 import golden as cases
from llm_kernels.harness.runner import main


def test_golden_cases_save_and_replay(tmp_path, monkeypatch, capsys):
    ckpt = write_random_checkpoint(preset("mini"), tmp_path / "ck", seed=11, dtype=torch.bfloat16,
                                   progress=False)
    built = cases.build_cases(ckpt)
    names = [c.name for c in built]
    assert any("bfloat16" in n for n in names) and "indexer_topk/causal" in names
    assert main(built, ["-k", "p130", "--save-data", str(tmp_path / "g")]) == 0
    assert main(built, ["-k", "topk"]) == 0
    out = capsys.readouterr().out
    assert "PASS runtime_decode/p130_d12_float32/logits" in out
    # replay must not need the golden: break it and replay
    for c in built:
        c.golden = lambda v: (_ for _ in ()).throw(AssertionError("golden called on replay"))
    assert main(built, ["-k", "p130", "--golden-data", str(tmp_path / "g")]) == 0
