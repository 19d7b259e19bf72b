"""Model-neutral numerics shared by the references, the kernels and the checkpoint code.

* :mod:`.rounding`: ``rnd`` (round to a storage dtype, back to float32), ``check_dtype``.
* :mod:`.linear`: ``linear`` / ``matmul`` in the storage dtype's arithmetic (float, bf16, W8A8).
* :mod:`.quant`: the W8A8 INT8 golden (``QuantWeight``, per-row activation quant, exact
  INT32 GEMM, Sylvester Hadamard).
* :mod:`.rope`: ``RopeParameters`` (one RoPE profile, default or YaRN) and its inverse
  frequencies.

Nothing here knows a model: no config class, no weight name.
"""
