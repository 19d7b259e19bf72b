"""DeepSeek-V4 runtime: per-sequence caches (:mod:`.cache`), the stage tables
(:mod:`.stages`) and the layer code over the shared engine core (:mod:`.engine`)."""
