"""How N ranks split a model: ``pp`` pipeline stages (contiguous layer ranges) times ``ep``
expert shards per stage (``N = pp * ep``).

Rank ``r`` is expert shard ``r % ep`` of stage ``r // ep`` (stage-major, the order
``torchrun`` numbers hosts in: the ranks of one stage are neighbours, so on a multi-host
run with ``--nproc-per-node ep`` one stage lives on one host and the expert all-gather never
leaves it). Stage ``s`` runs layers ``[first, stop)`` of :func:`split_layers`; stage 0 also
holds the embedding, the last stage the final norm, ``hc_head`` and the head.

Nothing here imports a model; the layer of a tensor name comes from the model's
``ModelSpec.layer_of``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RankLayout", "split_layers"]


def split_layers(n_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous ``[first, stop)`` layer ranges of ``stages`` pipeline stages over
    ``n_layers`` decoder layers: sizes differ by at most one, the earlier stages take the
    extra layers (the last stage also holds the head). Raises ValueError when ``stages`` is
    not in ``[1, n_layers]``."""
    if not 1 <= stages <= n_layers:
        raise ValueError(f"pipeline stages must be in [1, num_hidden_layers={n_layers}], got {stages}")
    base, extra = divmod(n_layers, stages)
    out, first = [], 0
    for s in range(stages):
        stop = first + base + (1 if s < extra else 0)
        out.append((first, stop))
        first = stop
    return out


@dataclass(frozen=True)
class RankLayout:
    """Rank ``rank``'s place in a run of ``world_size`` ranks as ``pp`` pipeline stages x
    ``world_size // pp`` expert shards (see the module docstring).

    Args:
        rank, world_size: this rank, the number of ranks.
        pp: pipeline stages (divides ``world_size``).
        n_layers: decoder layers of the model (``num_hidden_layers``).
        n_experts: routed experts per layer (0 for a dense model such as Qwen3).

    Raises ValueError (naming ``--pp`` / ``--nproc``) when ``pp`` does not divide the ranks,
    exceeds the layers, or the expert shards do not divide ``n_experts`` (a dense model
    needs one shard per stage: ``--pp`` equal to the ranks)."""

    rank: int
    world_size: int
    pp: int
    n_layers: int
    n_experts: int

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must lie in [0, {self.world_size}), got {self.rank}")
        if self.pp < 1 or self.world_size % self.pp:
            raise ValueError(f"--pp {self.pp} must divide the ranks (--nproc / WORLD_SIZE = {self.world_size})")
        split_layers(self.n_layers, self.pp)  # ValueError past the layers
        ep = self.world_size // self.pp
        if ep > 1 and not self.n_experts:
            raise ValueError(f"{self.world_size} ranks as {self.pp} pipeline stage(s) leave {ep} expert shards per "
                             "stage, but this model has no routed experts (n_routed_experts); give --pp "
                             f"{self.world_size}")
        if ep > 1 and self.n_experts % ep:
            divisors = [d for d in range(1, self.n_experts + 1) if self.n_experts % d == 0]
            raise ValueError(f"{self.world_size} ranks as {self.pp} pipeline stage(s) leave {ep} expert shards per "
                             f"stage, which must divide n_routed_experts={self.n_experts}; shards per stage may be "
                             f"one of {divisors}")

    @property
    def ep(self) -> int:
        """Expert shards per stage."""
        return self.world_size // self.pp

    @property
    def stage(self) -> int:
        """This rank's pipeline stage."""
        return self.rank // self.ep

    @property
    def ep_rank(self) -> int:
        """This rank's expert shard within its stage."""
        return self.rank % self.ep

    @property
    def layers(self) -> tuple[int, int]:
        """``[first, stop)``: the decoder layers of this rank's stage."""
        return split_layers(self.n_layers, self.pp)[self.stage]

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp - 1

    def stage_ranks(self, stage: int) -> list[int]:
        """The ranks of pipeline stage ``stage`` (its expert shards, in shard order)."""
        return list(range(stage * self.ep, (stage + 1) * self.ep))

    def peer(self, stage: int) -> int:
        """The rank of stage ``stage`` that exchanges hidden rows with this rank: the one of
        the same expert shard (each shard of a stage sends to its counterpart of the next)."""
        return stage * self.ep + self.ep_rank

    def describe(self) -> str:
        """One line for a person: ``4 ranks = 2 pipeline stages x 2 expert shards; layers
        [0, 2) | [2, 3)``."""
        ranges = " | ".join(f"[{a}, {b})" for a, b in split_layers(self.n_layers, self.pp))
        return (f"{self.world_size} ranks = {self.pp} pipeline stage{'s' if self.pp > 1 else ''} x {self.ep} "
                f"expert shard{'s' if self.ep > 1 else ''}; layers {ranges}")
