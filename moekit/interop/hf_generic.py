"""Counting any MoE model transformers knows, from its module tree on the meta device.

The generic path behind ``moekit params`` for model types without a native reader in
``moekit.interop.types``: transformers (the optional ``moekit[hf]`` extra) builds the model on
the meta device (no memory, no weights), and each parameter is classified by where it sits:

- routed experts: tensors under a module named ``experts`` (stacked ``[E, ...]`` or a numbered
  ``ModuleList``), or 3-D tensors ``[E, ...]`` of the MoE block itself (JetMoE); a token uses
  ``top_k / E`` of each, with top-k read from the config;
- routers: the MoE block's (or the experts module's) child named ``gate``, ``router``,
  ``classifier`` or ``wg``;
- shared experts: children whose name holds ``shared`` (``shared_expert``, ``shared_mlp``, ...);
- the input embedding and the output head (``get_input_embeddings`` / ``get_output_embeddings``);
- norms: parameters of any ``*Norm`` module;
- the rest by the decoder layer's child that holds it: ``attention``, ``linear_attention``
  (gated delta-net, lightning attention), ``mamba``, ``dense_ffn``, else that child's own name.

A model whose config names routed experts but whose tree shows none, or an MoE model with no
top-k in its config, is an error naming what was not found, never a silently wrong count.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections import defaultdict
from typing import Any

import torch

from moekit.accounting import COMPONENTS, Component, Counted, ParamCount, Term
from moekit.config import ConfigError

HF_EXTRA = "pip install 'moekit[hf]'"
_TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_top_k", "moe_k", "top_k_experts")
_N_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_ROUTER_NAMES = ("gate", "router", "classifier", "wg")


def _transformers(where: str):
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"{where}: counting this model type needs transformers: {HF_EXTRA}") from None
    return transformers


def _config_value(cfg: Any, keys: tuple[str, ...]) -> int | None:
    """The first integer among ``keys`` on the config or its nested sub-configs (DBRX's ffn_config)."""
    subs = [cfg] + [v for v in vars(cfg).values() if hasattr(v, "to_dict") and not isinstance(v, type)]
    for c in subs:
        for key in keys:
            v = getattr(c, key, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def build_meta_model(d: dict[str, Any], where: str) -> tuple[Any, Any]:
    """(config, model) of transformers' causal LM for config dict ``d``, on the meta device."""
    transformers = _transformers(where)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mt = d.get("model_type")
    if mt not in CONFIG_MAPPING or mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(
            f"{where}: unsupported model_type {mt!r}: neither moekit nor transformers "
            f"{transformers.__version__} knows it as a causal language model"
        )
    # NOTE: transformers logs and warns while building (unused keys, defaults); a one-line
    # error or the report is all a user should see.
    quiet = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()
            try:
                cls = CONFIG_MAPPING[mt]
                decode = getattr(cls, "_decode_special_floats", None)  # {"__float__": "Infinity"}
                cfg = cls.from_dict(decode(d) if decode is not None else d)
                with torch.device("meta"):
                    model = transformers.AutoModelForCausalLM.from_config(cfg)
            finally:
                transformers.logging.set_verbosity(verbosity)
    except ConfigError:
        raise
    except Exception as e:  # transformers raises anything from a bad config
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: transformers cannot build model_type {mt!r} from it: {msg}") from None
    return cfg, model


def _child_component(name: str, cls: str) -> str:
    """The component of a decoder layer's child module, from its name and class."""
    low = cls.lower()
    if "mamba" in low or name == "mamba":
        return "mamba"
    if any(k in low for k in ("deltanet", "linearattention", "lightning", "kimidelta")) or name == "linear_attn":
        return "linear_attention"
    if "shared" in name.lower():
        return "shared_experts"
    if "attention" in low or name in ("self_attn", "attn", "attention", "self_attention"):
        return "attention"
    if any(k in low for k in ("mlp", "feedforward", "ffn")) or name in ("mlp", "mlps", "feed_forward", "ffn"):
        return "dense_ffn"
    return name


def count_with_transformers(d: dict[str, Any], where: str = "Hugging Face config") -> Counted:
    """Parameters of transformers' model for config ``d``, by component (see the module docstring)."""
    cfg, model = build_meta_model(d, where)
    mt = d.get("model_type")
    modules = dict(model.named_modules())
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    emb_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    tied = bool(emb_ids & head_ids)
    params = dict(model.named_parameters())  # tied matrices appear once
    owner = {}
    for mname, m in modules.items():
        for pname, _ in m.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = m

    n_experts_cfg = _config_value(cfg, _N_EXPERT_KEYS)
    top_k = _config_value(cfg, _TOP_K_KEYS)

    total: dict[str, int] = defaultdict(int)
    active: dict[str, float] = defaultdict(float)
    matmul: float = 0.0

    def add(component: str, p: torch.Tensor, share: float = 1.0, is_matmul: bool | None = None) -> None:
        """Count ``p`` (the loop's current parameter ``name``); biases and vectors are not matmuls."""
        nonlocal matmul
        total[component] += p.numel()
        active[component] += p.numel() * share
        if is_matmul if is_matmul is not None else (p.dim() >= 2 and not name.endswith("bias")):
            matmul += p.numel() * share

    def stacked(m: torch.nn.Module) -> bool:  # owns [E, ...] expert tensors itself (JetMoE)
        return n_experts_cfg is not None and any(
            q.dim() == 3 and q.shape[0] == n_experts_cfg for q in m.parameters(recurse=False)
        )

    blocks = {n for n, m in modules.items() if "experts" in dict(m.named_children()) or stacked(m)}

    def routed(name: str, p: torch.Tensor, e: int) -> None:
        if top_k is None:
            raise ConfigError(
                f"{where}: model_type {mt!r} has routed experts ({name}) but its config has no top-k "
                f"(none of {', '.join(_TOP_K_KEYS)})"
            )
        add("routed_experts", p, share=min(top_k, e) / e)

    layer_re = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    for name, p in params.items():
        parts = name.split(".")
        m = owner.get(name)
        if id(p) in emb_ids:
            add("embedding", p, is_matmul=False)
        elif id(p) in head_ids:
            add("lm_head", p)
        elif m is not None and "norm" in type(m).__name__.lower():
            add("norms", p, is_matmul=False)
        elif any("shared" in seg for seg in parts):
            add("shared_experts", p)
        elif "experts" in parts:
            i = parts.index("experts")
            rest = parts[i + 1 :]
            holder = modules[".".join(parts[: i + 1])]
            if rest and rest[0] in _ROUTER_NAMES:  # JetMoE's attention experts hold their router
                add("routers", p)
            elif isinstance(holder, torch.nn.ModuleList) and rest and rest[0].isdigit():
                routed(name, p, len(holder))
            elif p.dim() == 2 and n_experts_cfg and p.shape[0] != n_experts_cfg and p.shape[0] % n_experts_cfg == 0:
                routed(name, p, n_experts_cfg)  # DBRX: [E·F, d] matrices
            elif p.dim() >= 2 or (n_experts_cfg is not None and p.shape[0] == n_experts_cfg):
                routed(name, p, p.shape[0])
            else:  # an output bias all experts share (JetMoE): always on
                add("moe_other", p, is_matmul=False)
        else:
            block = next(
                (".".join(parts[:j]) for j in range(len(parts) - 1, 0, -1) if ".".join(parts[:j]) in blocks), None
            )
            rel = parts[len(block.split(".")) :] if block is not None else []
            if block is not None and rel[0] in _ROUTER_NAMES:
                add("routers", p)
            elif block is not None and p.dim() == 3 and p.shape[0] == n_experts_cfg:
                routed(name, p, n_experts_cfg)
            else:
                lm = layer_re.search(name)
                if lm is None:
                    add(parts[1] if parts[0] == "model" and len(parts) >= 2 else parts[0], p)
                    continue
                child = name[lm.end() :].split(".")[0]
                child_mod = modules.get(name[: lm.end()] + child)
                component = _child_component(child, type(child_mod).__name__ if child_mod is not None else "")
                if block is not None and len(block) >= lm.end() + len(child) and component == "dense_ffn":
                    component = "moe_other"  # the MoE block's own bias or scale
                add(component, p)

    if n_experts_cfg and "routed_experts" not in total:
        raise ConfigError(
            f"{where}: model_type {mt!r} names {n_experts_cfg} routed experts but moekit found no expert "
            f"weights in transformers' {type(model).__name__}"
        )
    if "routed_experts" not in total:
        raise ConfigError(
            f"{where}: unsupported model_type {mt!r}: transformers' {type(model).__name__} has no routed experts "
            "(moekit counts MoE models of any type transformers knows; dense ones of its own types)"
        )
    notes = [f"counted from transformers' {type(model).__name__} on the meta device"]
    order = [c for c in COMPONENTS if c in total or c in ("embedding", "lm_head")]
    order[1:1] = [c for c in ("linear_attention", "mamba") if c in total]
    order += sorted(c for c in total if c not in order)
    comps = [
        Component(
            c,
            1,
            "",
            (Term("parameters", (total[c],), matmul=False),),
            active=round(active[c]),
        )
        for c in order
    ]
    tied_matmul = next(iter(head.parameters())).numel() if tied else 0  # the head still multiplies
    p = ParamCount.build(comps, tied_embeddings=tied, tied_head_matmul=0, notes=tuple(notes))
    p = _with_matmul(p, round(matmul) + tied_matmul)
    return Counted(name=str(d.get("_name_or_path") or mt), params=p, attention=None, max_seq_len=_max_len(cfg))


def _with_matmul(p: ParamCount, matmul: int) -> ParamCount:
    from dataclasses import replace

    return replace(p, matmul_active=matmul)


def _max_len(cfg: Any) -> int:
    v = _config_value(cfg, ("max_position_embeddings", "max_seq_len", "seq_length"))
    return v or 4096


__all__ = ["HF_EXTRA", "build_meta_model", "count_with_transformers"]
