"""Fused Numba kernels of the Qwen3 decode stages (same names and signatures as
``llm_kernels.reference.qwen3``)."""

# Attention side (per-head q/k norm + RoPE + paged KV write; flash-decoding over the pages):
#
# * :mod:`.qk_norm_rope` — ``qk_norm_rope_cache``: q_norm/k_norm RMSNorm + rotate-half RoPE,
#   k and v written into the paged cache at ``slot_mapping``, q returned (bit-exact).
# * :mod:`.attention` — ``paged_attention``: GQA decode attention over the paged cache
#   (flash-decoding: online softmax per (query row, context split), splits combined in order).
