"""Tests for llm_kernels.harness.runner."""

import io
import json

import pytest
import torch

from llm_kernels.harness import (
    AllClose, GoldenCase, GoldenDataError, Normal, RandInt, ScalarSpec, TensorSpec,
    TopKTieAware, Zeros, main, run_case, run_cases,
)


def _golden(v):
    return {"y": v["x"] * v["scale"], "s": v["x"].sum(dim=-1)}


def _good_impl(v):
    return {"y": v["x"] * v["scale"], "s": v["x"].sum(dim=-1)}


def _case(impl=_good_impl, golden=_golden, name="scale", comparators=None):
    return GoldenCase(
        name=name,
        inputs=[
            TensorSpec("x", (4, 8), torch.float32, Normal(seed=0)),
            ScalarSpec("scale", 2.0),
            TensorSpec("y", (4, 8), torch.float32, is_output=True),
        ],
        golden=golden,
        impl=impl,
        comparators=comparators if comparators is not None else {
            "y": AllClose(rtol=1e-6, atol=1e-6), "s": AllClose(rtol=1e-5, atol=1e-5)},
    )


def _lines(buf):
    return buf.getvalue().strip().splitlines()


def _raising_golden(v):
    raise AssertionError("golden must not be called on replay")


def test_pass_prints_one_line_per_output():
    buf = io.StringIO()
    res = run_case(_case(), stream=buf)
    assert res.passed and not res.replayed
    lines = _lines(buf)
    assert len(lines) == 2
    assert lines[0].startswith("PASS scale/y: ") and lines[1].startswith("PASS scale/s: ")
    assert set(res.outputs) == {"y", "s"}


def test_all_mismatches_reported_before_failing():
    buf = io.StringIO()
    res = run_case(_case(impl=lambda v: {"y": v["x"], "s": v["x"].sum(-1) + 1}), stream=buf)
    assert not res.passed
    lines = _lines(buf)
    assert len(lines) == 2
    assert lines[0].startswith("FAIL scale/y: ") and "mismatched" in lines[0]
    assert lines[1].startswith("FAIL scale/s: ")
    assert res.failed_outputs == ["y", "s"]


def test_missing_output_and_missing_comparator_are_fail_lines():
    buf = io.StringIO()
    res = run_case(_case(impl=lambda v: {"y": v["x"] * 2.0}), stream=buf)
    assert not res.passed
    lines = _lines(buf)
    assert lines[0].startswith("PASS scale/y")
    assert lines[1] == "FAIL scale/s: impl did not return this output"

    buf = io.StringIO()
    res = run_case(_case(comparators={"y": AllClose(0, 0)}), stream=buf)
    assert not res.passed
    assert "FAIL scale/s: no comparator declared for this output" in _lines(buf)

    buf = io.StringIO()
    res = run_case(_case(impl=lambda v: None), stream=buf)
    assert not res.passed and len(_lines(buf)) == 2
    assert all(line.startswith("FAIL") and "impl returned NoneType" in line
               for line in _lines(buf))


def test_impl_and_golden_get_private_copies():
    def golden(v):
        v["x"].zero_()  # in-place mutation must not leak into impl's inputs
        return {"y": torch.zeros(4, 8), "s": torch.zeros(4)}

    def impl(v):
        assert v["x"].abs().sum() > 0
        return {"y": torch.zeros(4, 8), "s": torch.zeros(4)}

    assert run_case(_case(impl=impl, golden=golden), stream=io.StringIO()).passed


def test_golden_output_checked_against_is_output_spec():
    buf = io.StringIO()
    res = run_case(_case(golden=lambda v: {"y": torch.zeros(4, 9), "s": torch.zeros(4)},
                         impl=lambda v: {"y": torch.zeros(4, 9), "s": torch.zeros(4)}),
                   stream=buf)
    assert not res.passed and "spec says (4, 8)" in _lines(buf)[0]


def test_topk_named_scores_resolved_from_inputs():
    case = GoldenCase(
        name="topk",
        inputs=[TensorSpec("scores", (3, 10), torch.float32, RandInt(0, 3, seed=0))],
        golden=lambda v: {"idx": v["scores"].topk(4, dim=-1).indices},
        impl=lambda v: {"idx": torch.sort(-v["scores"], dim=-1, stable=True).indices[:, :4]},
        comparators={"idx": TopKTieAware("scores")},
    )
    buf = io.StringIO()
    assert run_case(case, stream=buf).passed, buf.getvalue()


def test_save_then_replay(tmp_path):
    d = tmp_path / "data"
    assert run_case(_case(), save_data=d, stream=io.StringIO()).passed
    assert {p.name for p in d.iterdir()} == {"inputs.safetensors", "golden.safetensors",
                                             "manifest.json"}
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["case"] == "scale"
    assert manifest["torch_version"] == torch.__version__
    assert manifest["specs"][0] == {"name": "x", "kind": "tensor", "shape": [4, 8],
                                    "dtype": "float32", "init": "Normal(std=1.0, mean=0.0, seed=0)",
                                    "is_output": False}
    assert manifest["specs"][1]["value"] == 2.0
    assert manifest["comparators"]["y"].startswith("AllClose")

    # replay with the correct impl passes without calling golden
    buf = io.StringIO()
    res = run_case(_case(golden=_raising_golden), golden_data=d, stream=buf)
    assert res.passed and res.replayed, buf.getvalue()
    # replay with a wrong impl fails
    buf = io.StringIO()
    res = run_case(_case(golden=_raising_golden, impl=lambda v: {"y": v["x"], "s": v["x"].sum(-1)}),
                   golden_data=d, stream=buf)
    assert not res.passed and _lines(buf)[0].startswith("FAIL scale/y")


def test_replay_uses_frozen_inputs(tmp_path):
    d = tmp_path / "data"
    run_case(_case(), save_data=d, stream=io.StringIO())
    seen = {}

    def impl(v):
        seen["x"] = v["x"].clone()
        return _good_impl(v)

    # same spec name/shape but a different seed: replay must still use the frozen x
    case = _case(impl=impl, golden=_raising_golden)
    case.inputs[0] = TensorSpec("x", (4, 8), torch.float32, Normal(seed=99))
    assert run_case(case, golden_data=d, stream=io.StringIO()).passed
    assert torch.equal(seen["x"], TensorSpec("x", (4, 8), torch.float32, Normal(seed=0)).build())


def test_replay_errors_on_missing_or_stale_data(tmp_path):
    with pytest.raises(GoldenDataError, match="lacks inputs.safetensors"):
        run_case(_case(), golden_data=tmp_path / "nope", stream=io.StringIO())
    d = tmp_path / "data"
    run_case(_case(), save_data=d, stream=io.StringIO())
    extra = _case(golden=_raising_golden)
    extra.inputs.append(TensorSpec("bias", (8,), torch.float32, Zeros()))
    with pytest.raises(GoldenDataError, match="bias"):
        run_case(extra, golden_data=d, stream=io.StringIO())
    more_out = _case(golden=_raising_golden,
                     comparators={"y": AllClose(0, 0), "s": AllClose(0, 0), "z": AllClose(0, 0)})
    with pytest.raises(GoldenDataError, match="golden output.*'z'"):
        run_case(more_out, golden_data=d, stream=io.StringIO())
    stale = _case(golden=_raising_golden)
    stale.inputs[0] = TensorSpec("x", (4, 9), torch.float32, Normal(seed=0))
    with pytest.raises(GoldenDataError, match=r"shape \(4, 8\), expected \(4, 9\)"):
        run_case(stale, golden_data=d, stream=io.StringIO())


def test_run_cases_uses_subdirectories_and_isolates_errors(tmp_path):
    def crash(v):
        raise RuntimeError("boom")

    cases = [_case(name="a"), _case(name="b/c"), _case(name="crash", impl=crash)]
    buf = io.StringIO()
    results = run_cases(cases, save_data=tmp_path, stream=buf)
    assert [r.passed for r in results] == [True, True, False]
    assert results[2].error == "RuntimeError: boom"
    assert "ERROR crash: RuntimeError: boom" in _lines(buf)
    assert (tmp_path / "a" / "golden.safetensors").is_file()
    assert (tmp_path / "b_c" / "golden.safetensors").is_file()
    assert (tmp_path / "crash" / "golden.safetensors").is_file()  # saved before impl ran
    with pytest.raises(ValueError, match="share"):
        run_cases([_case(name="x"), _case(name="x")], stream=io.StringIO())


def test_main_exit_codes_filter_and_replay(tmp_path):
    good, bad = _case(name="good"), _case(name="bad", impl=lambda v: {"y": v["x"], "s": v["x"]})
    buf = io.StringIO()
    assert main([good], argv=[], stream=buf) == 0
    assert _lines(buf)[-1] == "1 passed, 0 failed"
    buf = io.StringIO()
    assert main([good, bad], argv=[], stream=buf) == 1
    assert _lines(buf)[-1] == "1 passed, 1 failed"
    buf = io.StringIO()
    assert main([good, bad], argv=["-k", "goo"], stream=buf) == 0
    assert not any("bad" in line for line in _lines(buf))
    assert main([good, bad], argv=["-k", "zzz"], stream=io.StringIO()) == 1

    d = str(tmp_path / "frozen")
    assert main([good], argv=["--save-data", d], stream=io.StringIO()) == 0
    replay_good = _case(name="good", golden=_raising_golden)
    replay_bad = _case(name="good", golden=_raising_golden, impl=lambda v: {"y": v["x"], "s": v["x"]})
    assert main([replay_good], argv=["--golden-data", d], stream=io.StringIO()) == 0
    assert main([replay_bad], argv=["--golden-data", d], stream=io.StringIO()) == 1
    # replaying a case that was never saved is an error, not a crash of main
    buf = io.StringIO()
    assert main([_case(name="other")], argv=["--golden-data", d], stream=buf) == 1
    assert any(line.startswith("ERROR other: GoldenDataError") for line in _lines(buf))


def test_main_default_stream_is_stdout(capsys):
    assert main([_case()], argv=[]) == 0
    out = capsys.readouterr().out
    assert "PASS scale/y" in out and "1 passed, 0 failed" in out
