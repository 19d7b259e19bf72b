"""The Qwen3 golden cases pass with the fused backend, replay from saved data, and fail
when a stage is broken (a q/k norm that forgets its rsqrt)."""

from __future__ import annotations

import dataclasses

import torch

from llm_kernels.checkpoint import write_random_checkpoint
from llm_kernels.models import preset
from llm_kernels.models.qwen3 import golden as cases_qwen3
from llm_kernels.harness.runner import main, run_case


def test_qwen3_cases_pass_and_replay(tmp_path, capsys):
    ckpt = tmp_path / "q3"
    write_random_checkpoint(preset("qwen3-mini", num_hidden_layers=2), ckpt, seed=1, dtype=torch.float32,
                            progress=False)
    cases = cases_qwen3.build_cases(ckpt)
    assert len(cases) == 8
    assert main(cases, ["--save-data", str(tmp_path / "g")]) == 0
    assert main(cases, ["--golden-data", str(tmp_path / "g"), "-k", "odd"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "PASS qwen3/runtime_fused_decode/w8a8/logits" in out


def test_broken_stage_fails():
    case = next(c for c in cases_qwen3.build_cases() if c.name.startswith("qwen3/qk_norm_rope_paged_attention_bf16/odd"))
    def no_rsqrt_impl(v):  # the impl's q/k norm multiplies by mean(x²)+eps (the seed review's bug)
        out = case.impl(v)
        x = v["q"].to(torch.bfloat16).float().view(out["q_rot"].shape)
        out["q_rot"] = out["q_rot"] * (x.pow(2).mean(-1, keepdim=True) + 1e-6) ** 1.5
        return out

    broken = dataclasses.replace(case, impl=no_rsqrt_impl)
    assert not run_case(broken)
