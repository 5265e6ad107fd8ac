"""Planning: which parallel layouts fit a model on N devices, and what each costs per device.

Pure functions over a ``ModelConfig`` and plain ints; nothing is built. ``moekit plan`` prints them.

- ``layout``: the parameters each rank holds under a ``moekit.parallel.layout.Layout`` (dp, ep,
  etp) of that package's contract (``per_rank_parameter_count``).
- ``activations``: the activation-memory formula of a training step, checked against measurement.
- ``cost``: memory per device and communication per step of one layout.
- ``plan``: every candidate layout ranked, with suggestions when none fits.
- ``units``: "80GiB" and dtype names.
"""

from moekit.parallel.layout import Layout
from moekit.planning.activations import ActivationEstimate, estimate_activations, training_activation_bytes
from moekit.planning.cost import LayoutCost, PlanRequest, layout_cost
from moekit.planning.layout import (
    ParamSplit,
    candidate_layouts,
    check_layout,
    per_rank_parameter_count,
    rank_parameter_split,
)
from moekit.planning.plan import Plan, plan
from moekit.planning.units import gib, normalise_dtype, parse_memory

__all__ = [
    "ActivationEstimate",
    "Layout",
    "LayoutCost",
    "ParamSplit",
    "Plan",
    "PlanRequest",
    "estimate_activations",
    "candidate_layouts",
    "check_layout",
    "gib",
    "layout_cost",
    "normalise_dtype",
    "parse_memory",
    "per_rank_parameter_count",
    "plan",
    "rank_parameter_split",
    "training_activation_bytes",
]
