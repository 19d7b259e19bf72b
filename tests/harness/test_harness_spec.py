"""Tests for llm_kernels.harness.spec."""

import pytest
import torch

from llm_kernels.harness import (
    Full, Normal, Ones, RandInt, ScalarSpec, TensorSpec, Uniform, Zeros, build_inputs,
)


def test_seeded_inits_are_deterministic():
    for init in (Normal(std=2.0, mean=1.0, seed=3), Uniform(-1.0, 1.0, seed=3),
                 RandInt(0, 100, seed=3)):
        a = TensorSpec("x", (4, 5), torch.float32, init).build()
        b = TensorSpec("x", (4, 5), torch.float32, init).build()
        assert torch.equal(a, b), init
        c = TensorSpec("x", (4, 5), torch.float32, type(init)(*_args(init), seed=4)).build()
        assert not torch.equal(a, c), init


def _args(init):
    if isinstance(init, Normal):
        return (init.std, init.mean)
    return (init.low, init.high)


def test_random_init_does_not_touch_global_rng():
    torch.manual_seed(123)
    ref = torch.rand(3)
    torch.manual_seed(123)
    TensorSpec("x", (64,), torch.float32, Normal(seed=0)).build()
    assert torch.equal(torch.rand(3), ref)


def test_init_values_and_dtypes():
    z = TensorSpec("z", (2, 3), torch.bfloat16, Zeros()).build()
    assert z.dtype == torch.bfloat16 and z.shape == (2, 3) and not z.any()
    assert torch.equal(TensorSpec("o", (2,), torch.int32, Ones()).build(),
                       torch.ones(2, dtype=torch.int32))
    assert torch.equal(TensorSpec("f", (2,), torch.float32, Full(2.5)).build(),
                       torch.full((2,), 2.5))
    r = TensorSpec("r", (1000,), torch.int32, RandInt(-3, 3, seed=0)).build()
    assert r.dtype == torch.int32 and int(r.min()) >= -3 and int(r.max()) <= 2
    u = TensorSpec("u", (1000,), torch.float32, Uniform(2.0, 3.0, seed=0)).build()
    assert float(u.min()) >= 2.0 and float(u.max()) < 3.0
    # bf16 and fp32 with the same seed hold the same draw up to rounding
    hb = TensorSpec("h", (64,), torch.bfloat16, Normal(seed=5)).build()
    hf = TensorSpec("h", (64,), torch.float32, Normal(seed=5)).build()
    assert torch.equal(hb, hf.to(torch.bfloat16))


def test_tensor_and_callable_inits():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    spec = TensorSpec("t", (2, 3), torch.float32, t)
    built = spec.build()
    assert torch.equal(built, t)
    built.add_(1)  # build returns a copy
    assert torch.equal(spec.build(), t)
    c = TensorSpec("c", [2, 2], torch.float64, lambda shape, dtype: torch.eye(2, dtype=dtype))
    assert c.shape == (2, 2) and torch.equal(c.build(), torch.eye(2, dtype=torch.float64))


def test_missing_init_raises_naming_spec():
    with pytest.raises(ValueError, match="'w_q'.*explicit init"):
        TensorSpec("w_q", (2, 2), torch.float32)
    # pure outputs need no init and are not inputs
    out = TensorSpec("y", (2,), torch.float32, is_output=True)
    assert build_inputs([out]) == {}


def test_seed_is_mandatory_and_bad_inits_rejected():
    with pytest.raises(TypeError, match="seed"):
        Normal()
    with pytest.raises(TypeError, match="seed"):
        Uniform(0.0, 1.0)
    with pytest.raises(ValueError):
        Uniform(1.0, 0.0, seed=0)
    with pytest.raises(TypeError, match="Full"):
        TensorSpec("x", (2,), torch.float32, 1.0)  # bare number is not an init
    with pytest.raises(TypeError, match="RandInt"):
        TensorSpec("i", (2,), torch.int32, Normal(seed=0)).build()
    with pytest.raises(ValueError, match="does not fit"):
        TensorSpec("i", (2,), torch.uint8, RandInt(0, 300, seed=0)).build()


def test_mis_shaped_tensor_init_raises():
    with pytest.raises(ValueError, match=r"'x'.*shape \(3, 2\).*expected \(2, 3\)"):
        TensorSpec("x", (2, 3), torch.float32, torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"'x'.*dtype torch.float16.*expected torch.float32"):
        TensorSpec("x", (2, 3), torch.float32, torch.zeros(2, 3, dtype=torch.float16))


def test_build_inputs_checks_callable_results_and_names():
    bad = TensorSpec("kv", (4, 8), torch.float32, lambda s, d: torch.zeros(4, 9, dtype=d))
    with pytest.raises(ValueError, match=r"'kv'.*\(4, 9\).*expected \(4, 8\)"):
        build_inputs([bad])
    not_tensor = TensorSpec("n", (1,), torch.float32, lambda s, d: [0.0])
    with pytest.raises(TypeError, match="'n'"):
        build_inputs([not_tensor])
    with pytest.raises(ValueError, match="duplicate"):
        build_inputs([TensorSpec("a", (1,), torch.float32, Zeros()), ScalarSpec("a", 1)])


def test_build_inputs_order_scalars_and_inout():
    specs = [
        TensorSpec("x", (2,), torch.float32, Ones()),
        ScalarSpec("eps", 1e-6),
        TensorSpec("cache", (3,), torch.float32, Zeros(), is_output=True),  # in/out
        TensorSpec("y", (2,), torch.float32, is_output=True),  # pure output
    ]
    vals = build_inputs(specs)
    assert list(vals) == ["x", "eps", "cache"]
    assert vals["eps"] == 1e-6
    with pytest.raises(TypeError):
        ScalarSpec("s", "1")
