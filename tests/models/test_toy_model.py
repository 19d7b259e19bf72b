"""A third model is one folder plus one registry line.

This test registers a toy model family that exists only here: a few lines of config, a
weight table, a reference stage table and an engine over the shared engine core (a
1-layer-per-block MLP language model: embed -> [RMSNorm -> up -> SiLU -> down + residual]
x L -> RMSNorm -> head). Then it runs the CLI's ``make-checkpoint``, ``generate`` and
``logits`` on it unchanged, and checks the logits against a direct torch forward.
Nothing outside ``llm_kernels/models/`` knows this model exists.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file

from llm_kernels import cli, models
from llm_kernels.checkpoint import TensorInfo
from llm_kernels.errors import ConfigError
from llm_kernels.numerics.linear import linear
from llm_kernels.numerics.rounding import rnd
from llm_kernels.runtime.engine_core import EngineCore
from llm_kernels.runtime.stage_table import StageTable


# ---------------------------------------------------------------- the toy model's folder
@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = 50
    hidden_size: int = 16
    intermediate_size: int = 24
    num_hidden_layers: int = 2
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ToyConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def to_hf_dict(self) -> dict:
        return {"model_type": "toy_mlp", **dataclasses.asdict(self)}

    def summary(self) -> str:
        return f"toy_mlp: {self.num_hidden_layers} layers, hidden {self.hidden_size}"

    def replace(self, **kw) -> "ToyConfig":
        return dataclasses.replace(self, **kw)


def _tensors(cfg: ToyConfig) -> dict[str, TensorInfo]:
    D, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    t = {"embed.weight": TensorInfo((V, D))}
    for i in range(cfg.num_hidden_layers):
        t[f"layers.{i}.norm.weight"] = TensorInfo((D,))
        t[f"layers.{i}.up.weight"] = TensorInfo((I, D))
        t[f"layers.{i}.down.weight"] = TensorInfo((D, I))
    t["norm.weight"] = TensorInfo((D,))
    t["head.weight"] = TensorInfo((V, D))
    return t


def _init(name, info, cfg, g, weight_scale):
    if name.endswith("norm.weight"):
        return 1 + 0.1 * torch.randn(info.shape, generator=g)
    fan_in = 1 if name == "embed.weight" else info.shape[1]
    return torch.randn(info.shape, generator=g) * weight_scale / math.sqrt(fan_in)


def _rms_norm(x, w, eps, dtype):
    xf = x.float()
    return rnd(w.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)), dtype)


def _mlp_block(x, norm_w, up_w, down_w, eps, dtype):
    h = linear(_rms_norm(x, norm_w, eps, dtype), up_w, dtype)
    return rnd(x + linear(rnd(torch.nn.functional.silu(h), dtype), down_w, dtype), dtype)


TOY_STAGES = StageTable(reference=dict(rms_norm=_rms_norm, mlp_block=_mlp_block, linear=linear), fused={})
TOY_OPS = TOY_STAGES.reference


class ToyEngine(EngineCore):
    """Stateless per token (an MLP LM has no KV cache): the core does the bookkeeping."""

    def __init__(self, weights, cfg, dtype, max_seq_len, ops=TOY_OPS, timer=None):
        super().__init__(cfg, dtype, timer)
        self.w, self.ops, self.max_seq_len, self.lengths = weights, ops, max_seq_len, {}

    def _new_sequence(self, sid):
        self.lengths[sid] = 0

    def _drop_sequence(self, sid):
        del self.lengths[sid]

    def _length(self, sid):
        return self.lengths[sid]

    def _reserve(self, seq_ids, lens):
        for s, n in zip(seq_ids, lens):
            if self.lengths[s] + n > self.max_seq_len:
                from llm_kernels.errors import CacheOverflowError

                raise CacheOverflowError(f"sequence {s} would exceed max_seq_len={self.max_seq_len}")

    def _commit(self, seq_ids, tokens, state):
        for s, t in zip(seq_ids, tokens):
            self.lengths[s] += len(t)

    def _forward(self, ids, seq_ids, starts, lens, state):
        cfg, w = self.cfg, self.w
        x = rnd(w["embed.weight"][ids].float(), self.dtype)
        for i in range(cfg.num_hidden_layers):
            with self.timer("mlp"):
                x = self.ops.mlp_block(x, w[f"layers.{i}.norm.weight"], w[f"layers.{i}.up.weight"],
                                       w[f"layers.{i}.down.weight"], cfg.rms_norm_eps, self.dtype)
        return x

    def _lm_head(self, x):
        y = self.ops.rms_norm(x, self.w["norm.weight"], self.cfg.rms_norm_eps, self.dtype)
        return self.ops.linear(y, self.w["head.weight"], self.dtype).float()


def _make_engine(weights, cfg, *, dtype, max_seq_len, backend="reference", timer=None, max_batch=1,
                 consume_weights=False):
    return ToyEngine(weights, cfg, dtype, max_seq_len, ops=TOY_STAGES.stages(backend), timer=timer)


def _preset(num_hidden_layers=None, n_routed_experts=None):
    if n_routed_experts is not None:
        raise ConfigError("toy_mlp is dense: --experts does not apply")
    cfg = ToyConfig()
    return cfg.replace(num_hidden_layers=num_hidden_layers) if num_hidden_layers else cfg


TOY_SPEC = models.ModelSpec(
    model_type="toy_mlp", config_class=ToyConfig, presets={"toy-tiny": _preset}, default_preset="toy-tiny",
    expected_float_tensors=_tensors, canonical_name=lambda n: n, is_ignored=lambda n, cfg=None: False,
    is_fp32_tensor=lambda n: False, is_w8a8_weight=lambda n: n.endswith((".up.weight", ".down.weight")),
    w8a8_modules=("layers.*.up", "layers.*.down"), init_tensor=_init, check_int_tensor=lambda n, t, c: None,
    stage_table=lambda: TOY_STAGES,
    make_engine=_make_engine,
)


# ---------------------------------------------------------------- the test
@pytest.fixture
def toy_registered():
    models.register(TOY_SPEC)  # the one registry line
    try:
        yield TOY_SPEC
    finally:
        models.unregister("toy_mlp")


def _direct_forward(weights, cfg, ids):
    """Whole-sequence forward without the engine, float32."""
    x = weights["embed.weight"][torch.tensor(ids)].float()
    for i in range(cfg.num_hidden_layers):
        x = _mlp_block(x, weights[f"layers.{i}.norm.weight"], weights[f"layers.{i}.up.weight"],
                       weights[f"layers.{i}.down.weight"], cfg.rms_norm_eps, torch.float32)
    return linear(_rms_norm(x, weights["norm.weight"], cfg.rms_norm_eps, torch.float32),
                  weights["head.weight"], torch.float32)


def test_toy_model_runs_through_the_cli(toy_registered, tmp_path, capsys):
    ckpt = tmp_path / "toy"
    assert cli.main(["make-checkpoint", "--preset", "toy-tiny", "--layers", "3", "--dtype", "float32",
                     "--out", str(ckpt)]) == 0
    assert '"model_type": "toy_mlp"' in (ckpt / "config.json").read_text()

    assert cli.main(["generate", "--checkpoint", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                     "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "model: toy_mlp: 3 layers" in out
    gen = [int(t) for t in out.split("generated ids:")[1].splitlines()[0].strip().split(",")]
    assert len(gen) == 5

    logits_file = tmp_path / "logits.safetensors"
    assert cli.main(["logits", "--checkpoint", str(ckpt), "--input-ids", "4,5,6,7", "--decode-ids", "8,9",
                     "--input-ids", "1,2", "--decode-ids", "3,4", "--out", str(logits_file)]) == 0
    got = load_file(str(logits_file))

    from llm_kernels.checkpoint import load_checkpoint

    cfg, w = load_checkpoint(ckpt, dtype=torch.float32, progress=False)
    assert isinstance(cfg, ToyConfig) and cfg.num_hidden_layers == 3
    for b, (prompt, dec) in enumerate((([4, 5, 6, 7], [8, 9]), ([1, 2], [3, 4]))):
        want = _direct_forward(w, cfg, prompt + dec)
        torch.testing.assert_close(got[f"prefill_logits.{b}"], want[:len(prompt)], rtol=0, atol=1e-5)
        # decode row i: the logits after feeding decode id i, i.e. position len(prompt) + i
        torch.testing.assert_close(got[f"decode_logits.{b}"], want[len(prompt):], rtol=0, atol=1e-5)

    # greedy ids from the CLI equal the direct forward's greedy continuation
    seq = [1, 2, 3]
    for _ in range(5):
        seq.append(int(_direct_forward(w, cfg, seq)[-1].argmax()))
    assert gen == seq[3:]

    # W8A8 through the shared quantize path uses the spec's weight set
    qdir = tmp_path / "toy-w8a8"
    assert cli.main(["quantize", "--checkpoint", str(ckpt), "--out", str(qdir)]) == 0
    assert '"layers.*.up"' in (qdir / "config.json").read_text()


def test_unregistered_model_type_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "toy_mlp"}')
    assert cli.main(["generate", "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model_type 'toy_mlp' is not supported" in err and "deepseek_v4" in err and "qwen3" in err


def test_register_refuses_duplicates(toy_registered):
    with pytest.raises(ValueError, match="already registered"):
        models.register(TOY_SPEC)
    with pytest.raises(ValueError, match="preset names"):
        models.register(dataclasses.replace(TOY_SPEC, model_type="toy2"))
