"""Model configuration: validated dataclasses, JSON round trip, fine-grained segmentation.

Every architecture moekit knows (Mixtral, Qwen-MoE, OLMoE, DeepSeekMoE, DeepSeek-V3, gpt-oss, ...)
is a *setting* of these dataclasses; nothing downstream branches on a model's name.

Conventions
- Widths: ``d_model`` is the residual width, ``*_ffn_dim`` the SwiGLU hidden width of one FFN.
- Shared experts are ``n_shared_experts`` SwiGLU FFNs of width ``shared_ffn_dim`` each; they are
  fused into one FFN of width ``n_shared_experts * shared_ffn_dim`` (mathematically identical).
- Layer indices are 0-based.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from moekit.errors import MoekitError


class ConfigError(MoekitError, ValueError):
    """A configuration value is invalid; the message names the field and what was expected."""


def check_positive(name: str, value: int | float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def check_finite(obj: Any, prefix: str) -> None:
    """Every float field of dataclass ``obj`` is finite (NaN compares false with every bound, so the
    range checks alone would let it through)."""
    dot = f"{prefix}." if prefix else ""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{dot}{f.name} must be a finite number, got {value!r}")


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


ROUTERS = ("topk", "switch", "noisy_topk", "hash", "expert_choice", "sparsemixer")


@dataclass
class AttentionConfig:
    """Self-attention: grouped-query attention (``kind="gqa"``) or DeepSeek's latent attention."""

    n_heads: int
    n_kv_heads: int | None = None  # GQA; None means n_heads (plain multi-head attention)
    head_dim: int | None = None  # None means d_model // n_heads
    kind: Literal["gqa", "mla"] = "gqa"
    qkv_bias: bool = False  # Qwen2-MoE, gpt-oss, PhiMoE
    o_bias: bool = False  # gpt-oss, PhiMoE
    # "head": RMSNorm(head_dim) shared by heads (Qwen3-MoE); "full": RMSNorm over the whole q and
    # k projections (OLMoE); "l2": parameter-free L2 norm per head (Llama 4).
    qk_norm: Literal["none", "head", "full", "l2"] = "none"
    # The "head" q/k norm comes after the rotary embedding, not before it (Hunyuan-MoE).
    qk_norm_after_rope: bool = False
    sinks: bool = False  # gpt-oss: one learned logit per head that soaks up attention mass
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # Hugging Face's rope_scaling dict, kept verbatim
    rope_interleave: bool = False  # DeepSeek-V3 checkpoints store rotary pairs interleaved
    # Rotary covers the first dims of each q/k head, the rest pass through unrotated (GLM-4.5,
    # MiniMax-M2: 0.5). As in transformers, r = int(head_dim * factor) sets the frequencies
    # (theta^(-2i/r), i < ceil(r/2)) and 2 * ceil(r/2) dims are rotated. GQA only; MLA has qk_rope_head_dim.
    partial_rotary_factor: float = 1.0
    # Sliding-window attention (gpt-oss, Mistral): a query sees itself and the sliding_window - 1
    # slots before it, in the layers listed in sliding_layers (None: every layer). Their KV cache
    # holds only the window.
    sliding_window: int | None = None
    sliding_layers: list[int] | None = None
    # Chunked attention (Llama 4): a query sees the earlier slots of its own chunk of
    # chunk_size slots, in chunked_layers (None: every layer). The cache is not bounded by it.
    chunk_size: int | None = None
    chunked_layers: list[int] | None = None
    # Layers without rotary embedding (Llama 4's NoPE layers). qk_norm "l2" skips them, and
    # attention temperature tuning applies only to them: queries at cache slot p are scaled by
    # 1 + temperature_scale * log(1 + floor((p + 1) / temperature_floor)) (Llama 4).
    nope_layers: list[int] | None = None
    temperature_tuning: bool = False
    temperature_floor: int = 8192
    temperature_scale: float = 0.1
    # Multi-head latent attention (DeepSeek-V2/V3), used when kind == "mla".
    q_lora_rank: int | None = None  # None: a plain q projection (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_bias: bool = False  # bias on q_a / kv_a / o projections (HF's attention_bias for MLA)
    # The softmax's logit scale; None: 1 / sqrt(head_dim). Granite sets it (attention_multiplier).
    softmax_scale: float | None = None
    # Clamp the q, k and v projections to [-clip_qkv, clip_qkv] before rotary (DBRX); None: no clamp.
    clip_qkv: float | None = None

    def validate(self, d_model: int) -> None:
        check_finite(self, "attention")
        check_positive("attention.n_heads", self.n_heads)
        check_choice("attention.kind", self.kind, ("gqa", "mla"))
        check_choice("attention.qk_norm", self.qk_norm, ("none", "head", "full", "l2"))
        check_positive("attention.rope_theta", self.rope_theta)
        if self.softmax_scale is not None:
            check_positive("attention.softmax_scale", self.softmax_scale)
            if self.kind == "mla":
                raise ConfigError("attention.softmax_scale is for kind='gqa' (latent attention derives its own)")
        if self.qk_norm_after_rope and self.qk_norm != "head":
            raise ConfigError("attention.qk_norm_after_rope needs attention.qk_norm='head'")
        if self.clip_qkv is not None:
            check_positive("attention.clip_qkv", self.clip_qkv)
            if self.kind == "mla":
                raise ConfigError("attention.clip_qkv is for kind='gqa'")
        if self.sliding_window is not None:
            check_positive("attention.sliding_window", self.sliding_window)
        elif self.sliding_layers is not None:
            raise ConfigError("attention.sliding_layers needs attention.sliding_window")
        if self.chunk_size is not None:
            check_positive("attention.chunk_size", self.chunk_size)
        elif self.chunked_layers is not None:
            raise ConfigError("attention.chunked_layers needs attention.chunk_size")
        check_positive("attention.temperature_floor", self.temperature_floor)
        check_positive("attention.temperature_scale", self.temperature_scale)
        if self.kind == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                check_positive(f"attention.{name}", getattr(self, name))
            if self.q_lora_rank is not None:
                check_positive("attention.q_lora_rank", self.q_lora_rank)
            if self.qk_rope_head_dim % 2:
                raise ConfigError("attention.qk_rope_head_dim must be even for rotary embedding")
            if self.partial_rotary_factor != 1.0:
                raise ConfigError("attention.partial_rotary_factor must be 1.0 with kind='mla' (see qk_rope_head_dim)")
            for name in ("sliding_window", "chunk_size", "nope_layers"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"attention.{name} is not supported with kind='mla' (GQA layers only)")
            return
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        check_positive("attention.n_kv_heads", self.n_kv_heads)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"attention.n_heads ({self.n_heads}) must be divisible by attention.n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim is None:
            if d_model % self.n_heads:
                raise ConfigError(
                    f"d_model ({d_model}) must be divisible by attention.n_heads "
                    f"({self.n_heads}), or set attention.head_dim explicitly"
                )
            self.head_dim = d_model // self.n_heads
        check_positive("attention.head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ConfigError(f"attention.head_dim must be even for rotary embedding, got {self.head_dim}")
        f = self.partial_rotary_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ConfigError(f"attention.partial_rotary_factor must be in (0, 1], got {f!r}")
        if self.rotary_dim < 1:
            raise ConfigError(
                f"attention.partial_rotary_factor ({f}) leaves no rotary dims (int(head_dim * factor) = 0)"
            )

    def is_chunked(self, layer: int) -> bool:
        return self.chunk_size is not None and (self.chunked_layers is None or layer in self.chunked_layers)

    def uses_rope(self, layer: int) -> bool:
        return self.nope_layers is None or layer not in self.nope_layers

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` attends through the sliding window."""
        return self.sliding_window is not None and (self.sliding_layers is None or layer in self.sliding_layers)

    @property
    def rotary_dim(self) -> int:
        """The rotary embedding's ``dim`` (``int(head_dim * factor)``); it rotates ``2 * ceil(dim / 2)`` dims."""
        if self.kind == "mla":
            return self.qk_rope_head_dim
        assert self.head_dim is not None
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_head_dim(self) -> int:
        """Width of one query/key head (nope + rope parts for MLA)."""
        if self.kind == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        assert self.head_dim is not None
        return self.head_dim


@dataclass
class MoEConfig:
    """The sparse FFN: routed experts, shared experts, router and load balancing."""

    n_routed_experts: int
    top_k: int
    expert_ffn_dim: int
    n_shared_experts: int = 0
    shared_ffn_dim: int | None = None  # width of each shared expert; None means expert_ffn_dim
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(d, 1)) scales the shared output
    shared_expert_bias: bool = False  # ERNIE-4.5 (use_bias): the shared experts' projections have biases
    # Router -------------------------------------------------------------------------------
    router: Literal["topk", "switch", "noisy_topk", "hash", "expert_choice", "sparsemixer"] = "topk"
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    # softmax, then top-k, then renormalise == Mixtral's top-k of logits, then softmax.
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # group-limited routing (DeepSeek-V3): experts in n_group groups ...
    topk_group: int = 1  # ... keep the best topk_group groups, then top-k inside them
    # How a group is scored: the sum of its top-2 scores (DeepSeek-V3) or its best score (V2).
    group_score: Literal["top2_sum", "max"] = "top2_sum"
    router_bias: bool = False  # gpt-oss: the gate Linear has a bias
    expert_bias: bool = False  # gpt-oss: expert projections have biases
    # The routed experts' gated unit: "swiglu" silu(g) * u; "clamped_swiglu" (gpt-oss)
    # g' * sigmoid(swiglu_alpha * g') * (u' + 1) with g' = min(g, swiglu_limit), u' = u clamped
    # to +-swiglu_limit.
    expert_activation: Literal["swiglu", "clamped_swiglu"] = "swiglu"
    # Llama 4: the gate weight scales each expert's input, expert(w * x), not its output w * expert(x).
    scale_expert_input: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # A per-expert bias added to scores for *selection only* (DeepSeek-V3's
    # e_score_correction_bias; auxiliary-loss-free balancing updates it). A buffer, not a weight.
    selection_bias: bool = False
    # Token choice: None is dropless, else each expert keeps ceil(T * K * cf / E) assignments
    # (GShard/Switch dropping). expert_choice: each expert takes ceil(T * cf / E) tokens; None
    # means cf = top_k (the compute of token-choice top-k).
    capacity_factor: float | None = None
    router_noise_std: float = 1.0  # noisy_topk: scale of the learned-noise term (training only)
    hash_seed: int = 0  # hash router: seed of its fixed random token id -> expert table
    # sparsemixer (PhiMoE): a logit more than 2 * eps (relative) below the round's best is masked
    # out of that round's softmax (HF's router_jitter_noise).
    sparsemixer_eps: float = 0.01
    # Balancing coefficients (0 disables) ----------------------------------------------------
    # Switch/GShard E * sum_i f_i * P_i, which is also DeepSeekMoE's expert-level loss (alpha_1):
    # the two formulas coincide (see moekit.balancing.switch_aux_loss).
    aux_loss_coef: float = 0.0
    device_loss_coef: float = 0.0  # DeepSeekMoE device-level loss alpha_2
    n_devices: int = 1  # experts grouped into this many devices for the device-level loss
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss
    z_loss_coef: float = 0.0  # ST-MoE router z-loss
    aux_free_rate: float = 0.0  # gamma of the aux-loss-free bias update; >0 enables it
    # Placement -------------------------------------------------------------------------------
    # Layer i is MoE iff i >= first_k_dense and (i - first_k_dense) % moe_every == 0, unless
    # moe_layers lists the MoE layers explicitly.
    first_k_dense: int = 0
    moe_every: int = 1
    moe_layers: list[int] | None = None

    def __post_init__(self) -> None:
        self.validate(None)

    def validate(self, n_layers: int | None) -> None:
        """Check every field; layer indices are range-checked once ``n_layers`` is known."""
        check_finite(self, "moe")
        for name in ("n_routed_experts", "top_k", "expert_ffn_dim", "n_group", "topk_group", "moe_every"):
            check_positive(f"moe.{name}", getattr(self, name))
        if self.top_k > self.n_routed_experts:
            raise ConfigError(f"moe.top_k ({self.top_k}) must be <= moe.n_routed_experts ({self.n_routed_experts})")
        if self.n_shared_experts < 0:
            raise ConfigError(f"moe.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.shared_ffn_dim is None:
            self.shared_ffn_dim = self.expert_ffn_dim
        check_positive("moe.shared_ffn_dim", self.shared_ffn_dim)
        if self.shared_expert_gate and self.n_shared_experts == 0:
            raise ConfigError("moe.shared_expert_gate needs moe.n_shared_experts >= 1")
        check_choice("moe.router", self.router, ROUTERS)
        check_choice("moe.score_func", self.score_func, ("softmax", "sigmoid"))
        check_choice("moe.expert_activation", self.expert_activation, ("swiglu", "clamped_swiglu"))
        check_positive("moe.swiglu_alpha", self.swiglu_alpha)
        check_positive("moe.swiglu_limit", self.swiglu_limit)
        check_choice("moe.group_score", self.group_score, ("top2_sum", "max"))
        check_positive("moe.routed_scaling_factor", self.routed_scaling_factor)
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"moe.n_routed_experts ({self.n_routed_experts}) must be divisible by moe.n_group ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ConfigError(f"moe.topk_group ({self.topk_group}) must be <= moe.n_group ({self.n_group})")
        if self.n_group > 1 and self.top_k > self.topk_group * (self.n_routed_experts // self.n_group):
            raise ConfigError("moe.top_k exceeds the experts inside the moe.topk_group kept groups")
        if self.capacity_factor is not None:
            check_positive("moe.capacity_factor", self.capacity_factor)
        check_positive("moe.n_devices", self.n_devices)
        if self.n_routed_experts % self.n_devices:
            raise ConfigError(
                f"moe.n_routed_experts ({self.n_routed_experts}) must be divisible by moe.n_devices ({self.n_devices})"
            )
        for name in ("aux_loss_coef", "device_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "aux_free_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"moe.{name} must be >= 0, got {getattr(self, name)}")
        if self.router_noise_std < 0:
            raise ConfigError(f"moe.router_noise_std must be >= 0, got {self.router_noise_std}")
        if isinstance(self.hash_seed, bool) or not isinstance(self.hash_seed, int) or self.hash_seed < 0:
            raise ConfigError(f"moe.hash_seed must be an integer >= 0, got {self.hash_seed!r}")
        self._validate_router_combination()
        if self.first_k_dense < 0:
            raise ConfigError(f"moe.first_k_dense must be >= 0, got {self.first_k_dense}")
        if n_layers is None:
            return
        if self.moe_layers is not None:
            for i in self.moe_layers:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers:
                    raise ConfigError(
                        f"moe.moe_layers entry {i!r} is out of range: expected 0 <= i < n_layers ({n_layers})"
                    )
            if len(set(self.moe_layers)) != len(self.moe_layers):
                raise ConfigError(f"moe.moe_layers has duplicates: {self.moe_layers}")
            self.moe_layers = sorted(self.moe_layers)
        elif self.first_k_dense > n_layers:
            raise ConfigError(f"moe.first_k_dense ({self.first_k_dense}) must be <= n_layers ({n_layers})")

    def _validate_router_combination(self) -> None:
        """Reject settings a router would silently ignore."""
        if self.router == "switch":
            if self.top_k != 1:
                raise ConfigError(f"moe.top_k must be 1 for router='switch' (top-1 routing), got {self.top_k}")
            if self.score_func != "softmax":
                raise ConfigError("moe.score_func must be 'softmax' for router='switch'")
        if self.router == "sparsemixer":
            if self.top_k != 2:
                raise ConfigError(
                    f"moe.top_k must be 2 for router='sparsemixer' (two rounds of top-1), got {self.top_k}"
                )
            if self.score_func != "softmax" or self.n_group > 1 or self.uses_selection_bias:
                raise ConfigError(
                    "router='sparsemixer' needs moe.score_func='softmax', moe.n_group=1 and no selection bias"
                )
            if self.sparsemixer_eps < 0:
                raise ConfigError(f"moe.sparsemixer_eps must be >= 0, got {self.sparsemixer_eps}")
        if self.router in ("hash", "expert_choice"):
            # Hash routing has no learned scores; expert choice ranks tokens per expert, so a
            # per-expert bias cannot change its choice, and groups do not apply.
            if self.uses_selection_bias:
                raise ConfigError(f"moe.selection_bias / moe.aux_free_rate have no effect with router={self.router!r}")
            if self.n_group > 1:
                raise ConfigError(f"moe.n_group must be 1 with router={self.router!r} (no group-limited routing)")
            why = "has no learned router" if self.router == "hash" else "is balanced by construction"
            names = ("aux_loss_coef", "device_loss_coef", "seq_aux_loss_coef")
            names += ("z_loss_coef",) if self.router == "hash" else ()
            for name in names:
                if getattr(self, name) > 0:
                    raise ConfigError(f"moe.{name} must be 0: router={self.router!r} {why}")

    def is_moe_layer(self, i: int) -> bool:
        if self.moe_layers is not None:
            return i in self.moe_layers
        return i >= self.first_k_dense and (i - self.first_k_dense) % self.moe_every == 0

    @property
    def uses_selection_bias(self) -> bool:
        return self.selection_bias or self.aux_free_rate > 0


@dataclass
class ModelConfig:
    """A decoder-only transformer LM whose FFNs are dense or MoE, layer by layer."""

    vocab_size: int
    d_model: int
    n_layers: int
    attention: AttentionConfig
    dense_ffn_dim: int  # width of the dense FFN in non-MoE layers
    moe: MoEConfig | None = None  # None: a dense model
    # layernorm (with bias): PhiMoE; layernorm_nobias: DBRX
    norm: Literal["rmsnorm", "layernorm", "layernorm_nobias"] = "rmsnorm"
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    lm_head_bias: bool = False  # PhiMoE
    dense_ffn_bias: bool = False  # ERNIE-4.5 (use_bias): the dense FFNs' projections have biases
    max_seq_len: int = 4096
    # Granite's multipliers (all 1.0 elsewhere): the embeddings are multiplied by
    # embedding_multiplier, each attention / FFN output by residual_multiplier before it joins the
    # residual stream, and the logits are divided by logits_divisor (HF's logits_scaling).
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_divisor: float = 1.0
    name: str = ""  # free text, for humans; never branched on

    def __post_init__(self) -> None:
        if isinstance(self.attention, dict):
            self.attention = dataclass_from_dict(AttentionConfig, self.attention, "attention")
        if isinstance(self.moe, dict):
            self.moe = dataclass_from_dict(MoEConfig, self.moe, "moe")
        self.validate()

    def validate(self) -> None:
        check_finite(self, "")
        for name in ("vocab_size", "d_model", "n_layers", "max_seq_len", "norm_eps", "embedding_multiplier"):
            check_positive(name, getattr(self, name))
        check_positive("residual_multiplier", self.residual_multiplier)
        check_positive("logits_divisor", self.logits_divisor)
        check_choice("norm", self.norm, ("rmsnorm", "layernorm", "layernorm_nobias"))
        if not isinstance(self.attention, AttentionConfig):
            raise ConfigError("attention must be an AttentionConfig (or a dict of its fields)")
        self.attention.validate(self.d_model)
        for key in ("sliding_layers", "chunked_layers", "nope_layers"):
            for i in getattr(self.attention, key) or []:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layers:
                    raise ConfigError(f"attention.{key} entry {i!r} is out of range: expected 0 <= i < n_layers")
        if self.moe is not None:
            self.moe.validate(self.n_layers)
        if self.n_dense_layers > 0:
            check_positive("dense_ffn_dim", self.dense_ffn_dim)

    # Derived ------------------------------------------------------------------------------
    @property
    def moe_layer_ids(self) -> list[int]:
        if self.moe is None:
            return []
        return [i for i in range(self.n_layers) if self.moe.is_moe_layer(i)]

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(i)

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - len(self.moe_layer_ids)

    # Serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return dataclass_from_dict(cls, data, "")

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with top-level fields changed (nested configs are copied)."""
        data = self.to_dict()
        data.update({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in changes.items()})
        return ModelConfig.from_dict(data)


def _check_type(where: str, value: Any, annotation: Any) -> Any:
    """Check a JSON value against a field annotation; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(annotation)):
            return None
        if len(args) == 1:  # Optional[X]: X's own message is the most precise
            return _check_type(where, value, args[0])
        for arg in args:
            try:
                return _check_type(where, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{where} has an invalid value {value!r}: expected {_type_name(annotation)}")
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{where} expected null, got {value!r}")
        return value
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{where} must be one of {list(typing.get_args(annotation))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_check_type(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be an object, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be an object, got {value!r}")
        return dataclass_from_dict(annotation, value, where)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "")


def dataclass_from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    dot = f"{prefix}." if prefix else ""
    if unknown:
        raise ConfigError(f"unknown config key '{dot}{unknown[0]}'; known keys: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _check_type(f"{dot}{f.name}", data[f.name], hints[f.name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config is missing the required key {dot}{f.name}")
    return cls(**kwargs)


def set_by_path(cfg: ModelConfig, assignments: dict[str, Any]) -> ModelConfig:
    """A validated copy with dotted keys set, e.g. ``{"moe.top_k": 4}``; unknown keys raise."""
    data = cfg.to_dict()
    for key, value in assignments.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key {key!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key {key!r}")
        node[parts[-1]] = value
    return ModelConfig.from_dict(data)


# Fields that change neither a model's tensors nor what its forward computes: a name, the context
# cap of generation, and the training objective's balance losses (the process layout, threads,
# kernels and the optimiser live outside ModelConfig altogether).
NOT_ARCHITECTURE = frozenset(
    {
        "name",
        "max_seq_len",
        "moe.n_devices",
        "moe.aux_loss_coef",
        "moe.device_loss_coef",
        "moe.seq_aux_loss_coef",
        "moe.z_loss_coef",
        "moe.aux_free_rate",
    }
)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k in ("attention", "moe"):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def architecture_fingerprint(cfg: ModelConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that define its tensors and function, as a flat ``{"moe.top_k": 2, ...}``.

    Two configs with equal fingerprints build models that accept each other's checkpoints and
    compute the same function; ``moe.uses_selection_bias`` stands in for ``aux_free_rate`` (it
    decides whether the selection-bias buffer exists; the rate itself is a training setting).
    """
    flat = _flatten(cfg.to_dict())
    fp = {k: v for k, v in flat.items() if k not in NOT_ARCHITECTURE}
    if cfg.moe is not None:
        fp["moe.uses_selection_bias"] = cfg.moe.uses_selection_bias
    return dict(sorted(fp.items()))


def fingerprint_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``["moe.top_k: 2 -> 4", ...]`` for every field where two fingerprints differ."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def fine_grained(cfg: ModelConfig, m: int) -> ModelConfig:
    """DeepSeekMoE fine-grained expert segmentation with factor ``m``.

    Every routed expert is split into ``m`` experts of width ``expert_ffn_dim / m`` and ``m``
    times as many are routed to per token, so total parameters and FLOPs are unchanged.
    Shared experts are segmented the same way (``n_shared * m`` experts of width / m).
    """
    if cfg.moe is None:
        raise ConfigError("fine_grained needs an MoE config (moe is None)")
    check_positive("m", m)
    moe = cfg.moe
    if moe.expert_ffn_dim % m:
        raise ConfigError(f"moe.expert_ffn_dim ({moe.expert_ffn_dim}) must be divisible by m ({m})")
    changes: dict[str, Any] = dict(
        n_routed_experts=moe.n_routed_experts * m,
        top_k=moe.top_k * m,
        expert_ffn_dim=moe.expert_ffn_dim // m,
        n_group=moe.n_group,
    )
    if moe.n_shared_experts:
        assert moe.shared_ffn_dim is not None
        if moe.shared_ffn_dim % m:
            raise ConfigError(f"moe.shared_ffn_dim ({moe.shared_ffn_dim}) must be divisible by m ({m})")
        changes.update(n_shared_experts=moe.n_shared_experts * m, shared_ffn_dim=moe.shared_ffn_dim // m)
    return cfg.replace(moe=dataclasses.replace(moe, **changes))


__all__ = [
    "AttentionConfig",
    "ConfigError",
    "architecture_fingerprint",
    "check_choice",
    "check_finite",
    "check_positive",
    "dataclass_from_dict",
    "MoEConfig",
    "ModelConfig",
    "fine_grained",
    "fingerprint_diff",
    "set_by_path",
]
