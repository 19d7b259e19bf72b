"""Every case of the model zoo (``tests/zoo.py``, the ``zoo_case`` fixture parametrised
over all models) writes a checkpoint that reads back as its config, in ours and in
transformers, with the same weights on both sides."""

from __future__ import annotations

import json

import torch

from llm_kernels import models


def test_zoo_checkpoint_reads_back(zoo_case):
    d = zoo_case.checkpoint()
    assert d == zoo_case.checkpoint()  # written once per session
    cfg, w = zoo_case.ours(torch.float32)
    assert cfg == zoo_case.cfg == models.load_config(d)
    assert models.spec_for_config(cfg).model_type == zoo_case.model_type
    assert json.loads((d / "config.json").read_text())["model_type"] == zoo_case.model_type
    m = zoo_case.hf(torch.float32)
    assert m.config.vocab_size == cfg.vocab_size and m.config.num_hidden_layers == cfg.num_hidden_layers
    # the embedding both sides read is the same float32 tensor
    ours_embed = next(v for k, v in w.items() if k in ("embed.weight", "model.embed_tokens.weight", "embed_tokens.weight"))
    assert torch.equal(m.get_input_embeddings().weight, ours_embed)
