"""Nemotron-H / Nemotron 3 (``nemotron_h``, NVIDIA): one mixer per layer, by ``layers_block_type``
(or the published ``hybrid_override_pattern``: M Mamba2, * attention, - MLP, E MoE), each after
one RMSNorm. MLPs and experts are not gated (up, down: 2·d·F, squared-ReLU); MoE layers add a
shared MLP, a sigmoid router with a selection bias and optionally a latent projection
(``moe_latent_size``: experts work in that width, with d → latent → d projections).

A Mamba2 mixer with H heads of ``mamba_head_dim`` (di = H·head_dim) and ``n_groups`` groups of
``ssm_state_size`` holds ``in_proj`` (d → 2·di + 2·G·N + H), a depthwise conv over di + 2·G·N
channels (+ bias), ``dt_bias``, ``A_log``, ``D`` (H each), a gated RMSNorm over di and
``out_proj`` (di → d). Source: transformers' ``modeling_nemotron_h.py``.
"""

from __future__ import annotations

from moekit.accounting import AttentionShape, Component, Counted, ParamCount, Term
from moekit.config import ConfigError
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import Reader

_PATTERN = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}


def layer_types(r: Reader) -> list[str]:
    types = r.get("layers_block_type", None, "layer_types")
    if types is None and isinstance(r.get("hybrid_override_pattern", None), str):
        pattern = r.get("hybrid_override_pattern")
        if any(c not in _PATTERN for c in pattern):
            raise ConfigError(f"{r.where}: 'hybrid_override_pattern' must use only M, E, * and -, got {pattern!r}")
        types = [_PATTERN[c] for c in pattern]
    if not isinstance(types, list) or any(t not in _PATTERN.values() for t in types):
        raise ConfigError(f"{r.where}: needs 'layers_block_type' (or 'hybrid_override_pattern'), got {types!r}")
    return types


def account(r: Reader) -> Counted:
    v, d = r.int("vocab_size"), r.int("hidden_size")
    types = layer_types(r)
    n = len(types)
    count = {t: types.count(t) for t in _PATTERN.values()}
    nm, na, nf, ne = count["linear_attention"], count["full_attention"], count["mlp"], count["moe"]
    tied = r.bool("tie_word_embeddings", False)
    h, g = r.int("num_attention_heads"), r.int("num_key_value_heads", r.int("num_attention_heads"))
    hd = r.int("head_dim", d // h)
    hm, pm = r.int("mamba_num_heads"), r.int("mamba_head_dim")
    ng, ns, k = r.int("n_groups", 1), r.int("ssm_state_size"), r.int("conv_kernel", 4)
    di = hm * pm
    conv = di + 2 * ng * ns
    mamba_bias, conv_bias, mlp_bias = (
        r.bool("use_bias", False),
        r.bool("use_conv_bias", True),
        r.bool("mlp_bias", False),
    )
    mamba = [
        Term("in_proj", (d, di + conv + hm)),
        Term("conv1d", (conv, k)),
        Term("dt_bias,A_log,D", (3, hm), matmul=False),
        Term("out_proj", (di, d)),
    ]
    if conv_bias:
        mamba.append(Term("conv1d bias", (conv,), matmul=False))
    if mamba_bias:
        mamba.append(Term("in_proj,out_proj bias", (di + conv + hm + d,), matmul=False))

    def mlp(width: int) -> tuple[Term, ...]:
        terms = (Term("up,down", (2, d, width)),)
        return terms + ((Term("bias", (width + d,), matmul=False),) if mlp_bias else ())

    comps = [
        Component("embedding", 1, "", (Term("vocab·d", (v, d), matmul=False),)),
        Component("attention", na, f"{na} attention layers", (Term("q", (d, h, hd)), Term("k,v", (2, d, g, hd)), Term("o", (h, hd, d)))),
        Component("mamba", nm, f"{nm} Mamba2 layers", tuple(mamba)),
        Component(
            "norms", n, f"{n} layers", (Term("norm", (d,), matmul=False),),
            once=(Term("final", (d,), matmul=False), Term("mamba gated norm", (nm, di), matmul=False)),
        ),
    ]  # fmt: skip
    if ne:
        e, top_k = r.int("n_routed_experts"), r.int("num_experts_per_tok")
        latent = r.int("moe_latent_size", None)
        width = latent or d
        f_e = r.int("moe_intermediate_size")
        comps += [
            Component("routers", ne, f"{ne} MoE layers", (Term("gate", (e, d)),)),
            Component("shared_experts", ne, f"{ne} MoE layers", mlp(r.int("moe_shared_expert_intermediate_size"))),
            Component("routed_experts", ne * e, f"{ne} MoE layers × {e} experts", (Term("up,down", (2, width, f_e)),), active_count=ne * top_k),
        ]  # fmt: skip
        if latent:
            lat = (Term("fc1,fc2 latent", (2, d, latent)),) + (
                (Term("bias", (latent + d,), matmul=False),) if mlp_bias else ()
            )
            comps.append(Component("moe_latent", ne, f"{ne} MoE layers", lat))
    comps += [
        Component("dense_ffn", nf, f"{nf} MLP layers", mlp(r.int("intermediate_size")) if nf else ()),
        Component("lm_head", 1, "", () if tied else (Term("vocab·d", (v, d)),)),
    ]
    p = ParamCount.build(
        comps,
        tied_embeddings=tied,
        tied_head_matmul=v * d if tied else 0,
        notes=(f"hybrid: {na} attention + {nm} Mamba2 layers (fixed-size state, no KV cache)",),
    )
    shape = AttentionShape(na, h, hd, hd, 2 * g * hd, f"2·{g}·{hd}")
    return Counted(str(r.d.get("_name_or_path") or "nemotron_h"), p, (shape,), r.int("max_position_embeddings", 4096))


NEMOTRON_H = ModelType("nemotron_h", account=account)
