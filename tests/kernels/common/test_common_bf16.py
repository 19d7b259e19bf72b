"""bf16 <-> fp32 bridges: bit-exact against torch's ``.to(torch.bfloat16)`` / ``.float()``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_kernels.kernels.common import bf16 as B


def _torch_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _special_values() -> np.ndarray:
    bits = []
    for hi in (0x0000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x3F81, 0x7F7F, 0x7F7E, 0x4000, 0x00FF):
        for sign in (0, 0x8000):
            h = (hi | sign) << 16
            # exact, just below/at/above the tie, the tie itself (even and odd kept LSB)
            for lo in (0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF):
                bits.append(h | lo)
    bits += [0x7F800000, 0xFF800000, 0x00000000, 0x80000000,       # ±inf, ±0
             0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF,       # max float -> inf / max bf16
             0x00000001, 0x807FFFFF, 0x00008000, 0x00018000]       # subnormals and their ties
    return np.array(bits, dtype=np.uint32).view(np.float32)


def _values() -> np.ndarray:
    rng = np.random.default_rng(0)
    rand_bits = rng.integers(0, 2 ** 32, size=1_000_000, dtype=np.uint64).astype(np.uint32)
    x = rand_bits.view(np.float32)
    x = x[~np.isnan(x)]
    normal = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-40, 38, 200_000)).astype(np.float32)
    return np.concatenate([_special_values(), x, normal])


@pytest.mark.parametrize("impl", ["numpy", "numba"])
def test_f32_to_bf16_matches_torch(impl):
    x = _values()
    ref = _torch_bits(x)
    if impl == "numpy":
        out = B.f32_to_bf16(x)
    else:
        out = np.empty(x.size, np.uint16)
        B.f32_to_bf16_nb(x, out)
    bad = np.nonzero(out != ref)[0]
    assert bad.size == 0, [(hex(int(x.view(np.uint32)[i])), hex(int(out[i])), hex(int(ref[i])))
                           for i in bad[:5]]


@pytest.mark.parametrize("impl", ["numpy", "numba"])
def test_nan_maps_to_quiet_nan(impl):
    nan_bits = np.array([0x7F800001, 0x7FC00000, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F80FFFF],
                        dtype=np.uint32)
    x = nan_bits.view(np.float32)
    if impl == "numpy":
        out = B.f32_to_bf16(x)
    else:
        out = np.empty(x.size, np.uint16)
        B.f32_to_bf16_nb(x, out)
    back = B.bf16_to_f32(out)
    assert np.isnan(back).all()                      # never rounds to inf
    assert ((out >> 15) == (nan_bits >> 31)).all()   # sign kept


def test_bf16_to_f32_exhaustive():
    h = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16)
    ref = torch.from_numpy(h.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    out = B.bf16_to_f32(h)
    assert (out.view(np.uint32) == ref.view(np.uint32)).all()
    out2 = np.empty(h.size, np.float32)
    B.bf16_to_f32_nb(h, out2)
    assert (out2.view(np.uint32) == ref.view(np.uint32)).all()


def test_zero_copy_views():
    t = torch.randn(4, 6).to(torch.bfloat16)
    u = B.torch_bf16_as_u16(t)
    assert u.dtype == np.uint16 and u.shape == (4, 6)
    assert u.ctypes.data == t.data_ptr()  # same memory
    u[0, 0] = 0x3F80  # 1.0 in bf16, written through the view
    assert t[0, 0].item() == 1.0
    back = B.u16_as_torch_bf16(u)
    assert back.dtype == torch.bfloat16 and back.data_ptr() == t.data_ptr()
    assert torch.equal(back, t)


def test_bridge_errors():
    with pytest.raises(TypeError):
        B.torch_bf16_as_u16(torch.zeros(2))
    with pytest.raises(TypeError):
        B.u16_as_torch_bf16(np.zeros(2, np.float32))
    with pytest.raises(TypeError):
        B.f32_to_bf16(np.zeros(2, np.float64))
    with pytest.raises(TypeError):
        B.bf16_to_f32(np.zeros(2, np.int32))
    with pytest.raises(TypeError):
        B.as_kernel_input(np.zeros(2, np.int8))


def test_kernel_views_registered_at_load():
    """attach_kernel_views: the registered view is what the bridges return (no new array),
    shares memory, keeps no tensor alive, and leaves torch.save / weights_only loads alone."""
    import gc
    import io
    import weakref

    from llm_kernels.kernels.deepseek_v4.stage_shared import f32_np

    w32 = torch.randn(4, 8)
    w16 = torch.randn(4, 8).to(torch.bfloat16)
    skipped = [torch.randn(8, 4).t(), torch.zeros(3, dtype=torch.int64), torch.randn(3, requires_grad=True), "x"]
    assert B.attach_kernel_views([w32, w16, *skipped]) == 2
    v32, v16 = B.kernel_view_of(w32), B.kernel_view_of(w16)
    assert v32 is not None and v16 is not None and all(B.kernel_view_of(t) is None for t in skipped[:3])
    assert B.torch_kernel_view(w32) is v32 and f32_np(w32) is v32
    assert B.torch_kernel_view(w16) is v16 and B.torch_bf16_as_u16(w16) is v16 and v16.dtype == np.uint16
    w32[1, 2] = 7.0                                   # in-place writes show through the view
    assert v32[1, 2] == np.float32(7.0)
    assert np.array_equal(v16, w16.view(torch.int16).numpy().view(np.uint16))
    buf = io.BytesIO()
    torch.save({"w32": w32, "w16": w16}, buf)          # nothing attached to the tensors themselves
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    assert torch.equal(back["w32"], w32) and torch.equal(back["w16"], w16)
    assert B.kernel_view_of(back["w32"]) is None       # a new tensor is not a registered weight
    n, ref = len(B.KERNEL_VIEWS), weakref.ref(w32)
    del w32, v32
    gc.collect()
    assert ref() is None and len(B.KERNEL_VIEWS) == n - 1
