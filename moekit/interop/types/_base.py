"""The record every Hugging Face model type fills in (``ModelType``) and the tensor layout it names.

A ``ModelType`` gathers everything moekit knows about one ``model_type`` string: how its
``config.json`` reads (and, when moekit can write it, writes), where its checkpoint keeps the MoE
tensors, which options transformers honours that moekit must refuse when loading, and which
checkpoint tensors the model does not use. One module under ``moekit.interop.types`` holds one
type (or a family sharing rules); the registry in ``moekit.interop.types`` finds them by itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from moekit.errors import MoekitError

if TYPE_CHECKING:
    from torch import Tensor

    from moekit.accounting import Component, Counted
    from moekit.config import ModelConfig
    from moekit.interop.types._reader import Reader


class UnsupportedError(MoekitError):
    """A model type, config option or tensor that moekit cannot map (the message names it)."""


@dataclass(frozen=True)
class HFLayout:
    """Where one Hugging Face model type keeps its MoE tensors (all other names are shared)."""

    moe: str  # the sparse block's module inside a layer: "block_sparse_moe" (Mixtral) or "mlp"
    expert: tuple[str, str, str]  # per-expert names of the gate (w1), up (w3) and down (w2) matrices
    shared: str | None = None  # shared-expert FFN module: "shared_expert" (Qwen2-MoE), "shared_experts"
    # The type's router always has a selection bias (DeepSeek-V3's e_score_correction_bias), so
    # an export of a model without one writes zeros.
    selection_bias: bool = False
    # For types whose files differ from these names by more than the MoE module's name (fused
    # q/k/v or expert tensors, a renamed router, another prefix): ``from_file`` rewrites a
    # checkpoint's tensors into the standard hub names above (views only, so it works on meta
    # tensors and copies nothing); ``to_file`` rewrites standard names into the type's files.
    from_file: Callable[[dict[str, Tensor], ModelConfig], dict[str, Tensor]] | None = None
    to_file: Callable[[dict[str, Tensor], ModelConfig], dict[str, Tensor]] | None = None
    router: str = "gate"  # the router's module inside ``moe`` ("router" in gpt-oss, Llama 4)
    dense: str = "mlp"  # the dense FFN's module in non-MoE layers ("feed_forward" in Llama 4)
    # None: per-expert tensors (``expert`` names), as the hub writes them. Otherwise only
    # transformers' fused tensors exist, ``experts.gate_up_proj [E, D, 2F]`` and
    # ``experts.down_proj [E, F, D]`` (note: [in, out], unlike nn.Linear), with the gate and up
    # columns "interleaved" (gpt-oss: gate at even, up at odd; plus ``_bias`` tensors ``[E, 2F]``,
    # interleaved too, and ``[E, D]``) or "concat" (Llama 4: gate first, then up).
    fused: Literal["interleaved", "concat"] | None = None


GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")


def _no_refusals(d: dict[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class ModelType:
    """Everything moekit knows about one Hugging Face ``model_type``.

    ``read`` turns a config into a buildable ``ModelConfig``; ``extras`` adds the components that
    config lacks (multi-token-prediction modules, Arctic's residual MLP), making the count a
    ``Counted``; ``account`` (for types moekit can count but not build: hybrids, zero-computation
    experts) turns the config straight into a ``Counted``. A type has ``read`` or ``account``, or
    both when transformers holds as parameters what moekit keeps as buffers (ERNIE's selection
    bias): ``account`` then counts for ``moekit params`` and ``read`` builds. ``write`` and
    ``architecture`` make it exportable; ``layout`` makes its checkpoints loadable. ``refuse`` raises ``UnsupportedError`` for options that change
    the computation but not the shapes (checked when loading weights, not when counting).
    ``ignored`` are regexes of checkpoint tensor names the model does not use, ``{n_layers}`` and
    ``{n_extra}`` filled in from the config (multi-token-prediction layers after the last one).
    ``claims`` says whether a ``ModelConfig`` looks like this type (``hf_export.infer_model_type``).
    ``architectures`` lists the ``architectures`` entries that identify the type when a config has
    no ``model_type`` (Grok-1 ports).
    """

    name: str
    read: Callable[[Reader], ModelConfig] | None = None
    account: Callable[[Reader], Counted] | None = None
    extras: Callable[[Reader, ModelConfig], list[Component]] | None = None
    write: Callable[[ModelConfig], dict[str, Any]] | None = None
    architecture: str | None = None
    layout: HFLayout | None = None
    refuse: Callable[[dict[str, Any]], None] = _no_refusals
    ignored: tuple[str, ...] = ()
    claims: Callable[[ModelConfig], bool] | None = None
    architectures: tuple[str, ...] = ()
    # Read from a sub-object (llama4's "text_config"); keys copied from the outer config.
    sub_config: str | None = None
    # The type's attention honours rope's ``partial_rotary_factor`` (others refuse one != 1).
    partial_rotary: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        if self.read is None and self.account is None and self.sub_config is None:
            raise ValueError(f"model type {self.name!r} needs a reader or an accountant")
        if self.write is not None and (self.architecture is None or self.claims is None):
            raise ValueError(f"model type {self.name!r} is writable but has no architecture or claims")

    @property
    def loadable(self) -> bool:
        """moekit can build it and map its checkpoint tensors."""
        return self.read is not None and self.layout is not None

    @property
    def writable(self) -> bool:
        return self.write is not None

    def ignore(self, d: dict[str, Any], n_layers: int) -> Callable[[str], bool]:
        """A predicate: is this checkpoint tensor one the model does not use?"""
        n_extra = int(d.get("num_nextn_predict_layers") or 0)
        layer = re.compile(r"model\.layers\.(\d+)\.")
        patterns = [re.compile(p) for p in self.ignored]

        def ignore(name: str) -> bool:
            if name.endswith("rotary_emb.inv_freq"):  # rotary caches of old exports, every type
                return True
            if any(p.fullmatch(name) for p in patterns):
                return True
            m = layer.match(name)
            return m is not None and n_layers <= int(m.group(1)) < n_layers + n_extra

        return ignore


def refused(d: dict[str, Any], key: str, why: str) -> UnsupportedError:
    """The error for a config option the loader refuses: names the type, key, value and why."""
    return UnsupportedError(
        f"config.json (model_type {d.get('model_type')}): '{key}' = {d[key]!r} is not supported: {why}"
    )
