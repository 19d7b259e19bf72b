"""Qwen3 torch reference: readable ground truth, one module per decode stage.

Stages (the fused kernels in ``llm_kernels/kernels/qwen3/`` use the same names):

* :mod:`.common` — ``rms_norm`` (with its rsqrt), ``rope_cos_sin``, rotate-half ``apply_rope``.
* :mod:`.qkv_proj` — ``input_norm_qkv``: input RMSNorm, then the Q/K/V projections.
* :mod:`.qk_norm_rope` — per-head ``q_norm``/``k_norm`` then RoPE.
* :mod:`.attention` — causal GQA attention over a dense K/V (``attention``).
* :mod:`.o_proj` — ``o_proj_residual_norm``: o_proj + residual + post-attention RMSNorm.
* :mod:`.mlp` — ``gate_up_swiglu`` and ``down_residual`` (SwiGLU MLP).
* :mod:`.model` — ``LayerWeights``, ``decoder_layer``, stateless ``forward`` -> logits.

Numerics: activations are float32 tensors holding ``dtype``-rounded values. ``dtype``
float32 is plain fp32; bfloat16 rounds after each op exactly where transformers'
``Qwen3ForCausalLM`` in bf16 (eager attention) does. A weight given as a
:class:`~llm_kernels.reference.deepseek_v4.quant.QuantWeight` runs W8A8 (per-token INT8
activations, exact INT32 GEMM). Source: transformers ``models/qwen3/modeling_qwen3.py``;
Qwen3 technical report (arXiv:2505.09388) §2.
"""
