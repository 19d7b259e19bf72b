"""Qwen3 runtime: the stage tables (:mod:`.stages`) and the layer code over the shared
engine core and the paged KV cache (:mod:`.engine`)."""
