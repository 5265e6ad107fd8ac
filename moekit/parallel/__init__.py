"""Data, expert and expert-tensor parallelism applied to a built model, on torch.distributed.

``parallelize(model, layout)`` shards the experts and installs the dispatchers; ``sync_gradients``
and ``clip_grad_norm_`` finish a backward; ``full_state_dict`` / ``full_optimizer_state`` give
layout-independent checkpoints; ``rank_parameters`` says what one rank holds; ``load_sharded``
loads a checkpoint folder with each rank reading only its own experts.
"""

from moekit.parallel.apply import ExpertLayoutWarning, ExpertShard, expert_shards, parallel_groups, parallelize
from moekit.parallel.groups import ProcessGroups, make_groups
from moekit.parallel.layout import Layout, RankCoords
from moekit.parallel.loading import LoadReport, load_sharded, together
from moekit.parallel.state import (
    all_reduce_sum,
    clip_grad_norm_,
    full_gradients,
    full_optimizer_state,
    full_state_dict,
    rank_parameters,
    shard_optimizer_state,
    sync_gradients,
)

__all__ = [
    "ExpertLayoutWarning",
    "ExpertShard",
    "Layout",
    "LoadReport",
    "ProcessGroups",
    "RankCoords",
    "all_reduce_sum",
    "clip_grad_norm_",
    "expert_shards",
    "full_gradients",
    "full_optimizer_state",
    "full_state_dict",
    "load_sharded",
    "make_groups",
    "parallel_groups",
    "parallelize",
    "rank_parameters",
    "shard_optimizer_state",
    "sync_gradients",
    "together",
]
