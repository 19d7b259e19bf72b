"""Model-neutral numerics shared by the references, the kernels and the checkpoint code.

* :mod:`.rounding`: ``rnd`` (round to a storage dtype, back to float32), ``check_dtype``.
* :mod:`.linear`: ``linear`` / ``matmul`` in the storage dtype's arithmetic (float, bf16, W8A8).
* :mod:`.quant`: the W8A8 INT8 golden (``QuantWeight``, per-row activation quant, exact
  INT32 GEMM, Sylvester Hadamard).
* :mod:`.group_quant`: group-scaled INT8 (``int8_g32``: one scale per 32 inputs) and its GEMM golden.
* :mod:`.mxfp4`: MXFP4 weights (E2M1 + UE8M0 per 32) kept 4-bit, and the W4A8 GEMM golden.
* :mod:`.fp8`: FP8 e4m3 weights with 128 x 128 block scales (UE8M0 / bf16 / fp32): encode, exact decode.
* :mod:`.rope`: ``RopeParameters`` (one RoPE profile, default or YaRN) and its inverse
  frequencies.

Nothing here knows a model: no config class, no weight name.
"""
