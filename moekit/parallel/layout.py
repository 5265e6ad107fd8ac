"""How N processes share a model: data, expert and expert-tensor parallel sizes, and who is who.

The semantics are the standard ones (Megatron, DeepSpeed): every rank is a data-parallel rank that
reads its own part of the global batch, except that the ``etp`` ranks of one tensor-parallel group
share their tokens, so ``world = dp * etp``. Expert parallelism is carved out of the data-parallel
ranks: ``ep`` divides ``dp``, and each expert is replicated over ``dp / ep`` expert-data-parallel
copies. ``ep`` must divide the routed experts and ``etp`` the expert width.

Rank numbering: ``rank = dp_index * etp + etp_index``; within one ``etp_index`` column, data
ranks ``dp_index`` form expert-parallel groups of ``ep`` consecutive ranks, ``ep_rank = dp_index
% ep``. ``RankCoords`` names a rank's place; ``expert_slice`` what part of the experts it holds.

Plain data (no torch, no process groups): ``moekit.planning`` counts and costs the same layouts
without starting anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moekit.config import ConfigError


@dataclass(frozen=True)
class Layout:
    """Plain, serialisable parallel sizes; ``Layout()`` is one process."""

    dp: int = 1  # data-parallel ranks (each reads its own micro-batch)
    ep: int = 1  # expert-parallel group size (experts sharded along E), divides dp
    etp: int = 1  # expert tensor-parallel group size (each expert's width F sliced), shares tokens

    @property
    def world_size(self) -> int:
        return self.dp * self.etp

    def text(self) -> str:
        """A short name for tables and messages, e.g. ``dp4·ep2·etp1``."""
        return f"dp{self.dp}·ep{self.ep}·etp{self.etp}"

    @classmethod
    def for_world(cls, world_size: int, ep: int | None = None, etp: int | None = None) -> Layout:
        """The layout of ``world_size`` processes: ``dp = world_size / etp``; no flags is plain DP."""
        ep, etp = 1 if ep is None else ep, 1 if etp is None else etp
        _check_int("ep", ep)
        _check_int("etp", etp)
        if world_size % etp:
            raise ConfigError(f"etp ({etp}) must divide the number of processes ({world_size}): world = dp x etp")
        return cls(dp=world_size // etp, ep=ep, etp=etp)

    def validate(self, world_size: int, n_routed_experts: int | None, expert_ffn_dim: int | None) -> None:
        """Raise ``ConfigError`` naming the field unless this layout fits the world and the model."""
        for name in ("dp", "ep", "etp"):
            _check_int(name, getattr(self, name))
        if self.world_size != world_size:
            raise ConfigError(
                f"dp x etp ({self.dp} x {self.etp} = {self.world_size}) must equal the number of processes ({world_size})"
            )
        if self.dp % self.ep:
            raise ConfigError(f"ep ({self.ep}) must divide dp ({self.dp}): expert parallelism uses data-parallel ranks")
        if n_routed_experts is None and (self.ep > 1 or self.etp > 1):
            raise ConfigError(f"ep ({self.ep}) and etp ({self.etp}) need a model with routed experts (moe is null)")
        if n_routed_experts is not None and n_routed_experts % self.ep:
            raise ConfigError(f"ep ({self.ep}) must divide moe.n_routed_experts ({n_routed_experts})")
        if expert_ffn_dim is not None and expert_ffn_dim % self.etp:
            raise ConfigError(f"etp ({self.etp}) must divide moe.expert_ffn_dim ({expert_ffn_dim})")

    def coords(self, rank: int) -> RankCoords:
        dp_index, etp_index = divmod(rank, self.etp)
        return RankCoords(rank, dp_index, etp_index, dp_index % self.ep, dp_index // self.ep)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        unknown = sorted(set(data) - {"dp", "ep", "etp"})
        if unknown:
            raise ConfigError(f"unknown layout field(s) {unknown}; expected dp, ep, etp")
        return cls(**data)


@dataclass(frozen=True)
class RankCoords:
    """One rank's place in a layout."""

    rank: int
    dp_index: int  # which micro-batch it reads (shared by its etp group)
    etp_index: int  # which slice of each expert's width it holds
    ep_rank: int  # which block of experts it holds
    edp_index: int  # which expert-data-parallel copy of that block it is


def expert_slice(layout: Layout, c: RankCoords, n_experts: int, ffn_dim: int) -> tuple[slice, slice]:
    """The global expert ids and the expert-width columns rank ``c`` holds."""
    e, f = n_experts // layout.ep, ffn_dim // layout.etp
    return slice(c.ep_rank * e, (c.ep_rank + 1) * e), slice(c.etp_index * f, (c.etp_index + 1) * f)


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
