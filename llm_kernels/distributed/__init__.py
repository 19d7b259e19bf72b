"""Running a model over several processes / hosts with ``torch.distributed`` (gloo, TCP).

* :mod:`.expert_parallel`: expert parallelism (EP): routed experts sharded over ranks
  (expert ``e`` on rank ``e // (E / N)``), the MoE step's dispatch and fixed-order combine
  (:class:`ExpertParallelOps`, a wrapper of the engine's ``ops`` namespace), placeholders
  for remote experts, the load predicate.
* :mod:`.group`: the process group, heartbeat and the diagnosis naming a failed rank.
* :mod:`.digest`: checkpoint / settings digests compared across ranks at start.
* :mod:`.launch`: ``--nproc N`` (N local ranks, the torchrun environment convention).
* :mod:`.runner`: one rank's life (join, check, run, barrier, leave; errors -> exit codes).
* :mod:`.netns`: ranks in separate network namespaces (veth + bridge, tc shaping).
* :mod:`.predict`: the paper model of decode tok/s and memory at N hosts.

See ``docs/distributed.md``. Nothing here imports a model: EP applies to any engine whose
``ops`` has a ``moe`` stage and whose config has ``n_routed_experts``.
"""

from .expert_parallel import EXPERT_NAME, ExpertParallelOps, ExpertShard, RemoteExpert, RoutingMismatch
from .group import RankFailure, RankGroup, env_world
from .launch import spawn_local

__all__ = ["EXPERT_NAME", "ExpertParallelOps", "ExpertShard", "RemoteExpert", "RoutingMismatch", "RankFailure",
           "RankGroup", "env_world", "spawn_local"]
