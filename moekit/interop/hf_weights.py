"""Hugging Face checkpoint tensors <-> moekit state dicts: name maps plus explicit expert stack/split.

A moekit state dict and a Hugging Face (hub layout) state dict differ in two ways only:
1. names, mapped by the rules in ``_RULES`` (templated by the model type's ``HFLayout``);
2. routed experts: moekit stacks them (``w1_EFD``, ``w3_EFD``, ``w2_EDF``), the hub layout keeps
   one ``[F, D]`` / ``[D, F]`` tensor per expert (``experts.{j}.gate_proj.weight``, ...).

Loading also accepts the fused layout transformers 5 uses in memory
(``experts.gate_up_proj [E, 2F, D]`` = gate then up, ``experts.down_proj [E, D, F]``), although
``save_pretrained`` of transformers 5 writes the hub layout for the types it converts. Types
whose checkpoints only ever hold fused tensors (gpt-oss, Llama 4: ``HFLayout.fused``) are read
and written in their own ``[E, D, 2F]`` / ``[E, F, D]`` layout, gate and up interleaved or
concatenated. Types whose files differ from these names by more than the MoE module's name
(DBRX's fused q/k/v, Granite's fused experts, renamed routers) rewrite them with their layout's
``from_file`` / ``to_file``; the checks here see the standard names.

Everything here works on meta tensors too, which is how shapes are checked without reading data.
``hf_sources`` says where each moekit tensor comes from (a ``Piece``: a checkpoint tensor and an
index into it, or one piece per expert), so one process can read everything and stack, and a
rank of a sharded model can read only the slices of the pieces it holds.
Shapes: E experts, F expert width, D model width.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.errors import CheckpointError
from moekit.interop.types import TYPES, HFLayout, UnsupportedError

LAYOUTS: dict[str, HFLayout] = {name: t.layout for name, t in TYPES.items() if t.layout is not None}


def layout(model_type: str) -> HFLayout:
    try:
        return LAYOUTS[model_type]
    except KeyError:
        raise UnsupportedError(
            f"model_type {model_type!r} has no weight mapping; supported: {sorted(LAYOUTS)}"
        ) from None


# (moekit name pattern, HF name template) for every tensor except the stacked routed experts.
# Templates see {moe} and {shared} from the layout; \1, \2 are the pattern's groups.
_L = r"layers\.(\d+)\."
_RULES: list[tuple[str, str]] = [
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"norm\.(weight|bias)", r"model.norm.\1"),
    (r"lm_head\.(weight|bias)", r"lm_head.\1"),
    (_L + r"attn_norm\.(weight|bias)", r"model.layers.\1.input_layernorm.\2"),
    (_L + r"ffn_norm\.(weight|bias)", r"model.layers.\1.post_attention_layernorm.\2"),
    (_L + r"attn\.(\w+\.weight|\w+\.bias|sinks)", r"model.layers.\1.self_attn.\2"),
    (_L + r"ffn\.w1\.(weight|bias)", r"model.layers.\1.{dense}.gate_proj.\2"),  # dense FFN layers
    (_L + r"ffn\.w3\.(weight|bias)", r"model.layers.\1.{dense}.up_proj.\2"),
    (_L + r"ffn\.w2\.(weight|bias)", r"model.layers.\1.{dense}.down_proj.\2"),
    (_L + r"ffn\.router\.gate\.(weight|bias)", r"model.layers.\1.{moe}.{router}.\2"),
    (_L + r"ffn\.router\.selection_bias", r"model.layers.\1.{moe}.gate.e_score_correction_bias"),
    (_L + r"ffn\.shared_experts\.w1\.(weight|bias)", r"model.layers.\1.{moe}.{shared}.gate_proj.\2"),
    (_L + r"ffn\.shared_experts\.w3\.(weight|bias)", r"model.layers.\1.{moe}.{shared}.up_proj.\2"),
    (_L + r"ffn\.shared_experts\.w2\.(weight|bias)", r"model.layers.\1.{moe}.{shared}.down_proj.\2"),
    (_L + r"ffn\.shared_gate\.weight", r"model.layers.\1.{moe}.shared_expert_gate.weight"),
]
_EXPERTS = re.compile(_L + r"ffn\.experts\.(w1|w3|w2)")
_W_INDEX = {"w1": 0, "w3": 1, "w2": 2}
_EXPERT_BIAS = re.compile(_L + r"ffn\.experts\.(b1|b3|b2)")


def _fuse_interleaved(sd: Mapping[str, Tensor], layer: int, lay: HFLayout) -> dict[str, Tensor]:
    """One layer's stacked experts as transformers' fused tensors (see ``HFLayout.fused``)."""
    p, base = f"layers.{layer}.ffn.experts.", f"model.layers.{layer}.{lay.moe}.experts."
    w1, w3, w2 = sd[p + "w1"], sd[p + "w3"], sd[p + "w2"]
    e, f, d = w1.shape
    gate_up_EXD = (
        torch.stack([w1, w3], dim=2).reshape(e, 2 * f, d) if lay.fused == "interleaved" else torch.cat([w1, w3], 1)
    )
    out = {
        base + "gate_up_proj": gate_up_EXD.transpose(1, 2).contiguous(),
        base + "down_proj": w2.transpose(1, 2).contiguous(),
    }
    if p + "b1" in sd:
        out[base + "gate_up_proj_bias"] = torch.stack([sd[p + "b1"], sd[p + "b3"]], dim=2).reshape(e, 2 * f)
        out[base + "down_proj_bias"] = sd[p + "b2"]
    return out


def hf_name(name: str, lay: HFLayout, model_type: str = "") -> str:
    """The HF name of one (non-routed-expert) moekit tensor."""
    for pattern, template in _RULES:
        m = re.fullmatch(pattern, name)
        if m is None:
            continue
        if "{shared}" in template and lay.shared is None:
            break
        return m.expand(template.format(moe=lay.moe, shared=lay.shared, router=lay.router, dense=lay.dense))
    raise UnsupportedError(f"moekit tensor {name!r} has no Hugging Face name in model type {model_type!r}")


def expert_names(layer: int, n_experts: int, lay: HFLayout) -> list[tuple[str, str, str]]:
    """Per-expert HF names ``(gate, up, down)`` of one MoE layer, expert by expert."""
    base = f"model.layers.{layer}.{lay.moe}.experts"
    gate, up, down = lay.expert
    return [
        (f"{base}.{j}.{gate}.weight", f"{base}.{j}.{up}.weight", f"{base}.{j}.{down}.weight") for j in range(n_experts)
    ]


def to_hf_state_dict(
    sd: Mapping[str, Tensor], cfg: ModelConfig, model_type: str, complete: bool = False, standard: bool = False
) -> dict[str, Tensor]:
    """moekit state dict -> hub-layout HF tensors (experts split; the tied head left out).

    ``complete`` adds what the HF model always has but ``cfg`` lacks (a zero selection bias).
    Split experts are views of the stacked weights; clone them before writing files that
    refuse shared storage (safetensors does). ``standard`` keeps the standard hub names of
    ``HFLayout`` (not the type's own file layout, for types that have a ``to_file``).
    """
    lay = layout(model_type)
    out = _standard_hf(sd, cfg, model_type, lay, complete)
    if lay.to_file is not None and not standard:
        out = lay.to_file(out, cfg)
    return out


def _standard_hf(
    sd: Mapping[str, Tensor], cfg: ModelConfig, model_type: str, lay: HFLayout, complete: bool
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, t in sd.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # HF re-ties lm_head to embed_tokens from tie_word_embeddings
        if lay.fused is not None and (_EXPERTS.fullmatch(name) or _EXPERT_BIAS.fullmatch(name)):
            if name.endswith(".w1"):
                out.update(_fuse_interleaved(sd, int(name.split(".")[1]), lay))
            continue
        m = _EXPERTS.fullmatch(name)
        if m is None:
            out[hf_name(name, lay, model_type)] = t
            continue
        layer, w = int(m.group(1)), _W_INDEX[m.group(2)]
        for names, t_e in zip(expert_names(layer, t.shape[0], lay), t.unbind(0), strict=True):
            out[names[w]] = t_e
    if complete and lay.selection_bias and cfg.moe is not None and not cfg.moe.uses_selection_bias:
        ref = sd["embed.weight"]
        for i in cfg.moe_layer_ids:
            bias = torch.zeros(cfg.moe.n_routed_experts, dtype=torch.float32, device=ref.device)
            out[f"model.layers.{i}.{lay.moe}.gate.e_score_correction_bias"] = bias
    return out


def meta_state_dict(cfg: ModelConfig) -> dict[str, Tensor]:
    """The state dict of a ``MoETransformer(cfg)`` as meta tensors (names, shapes; no memory)."""
    from moekit.models.transformer import MoETransformer  # interop sits downstream of models

    with torch.device("meta"):
        return MoETransformer(cfg).state_dict()


def expected_hf_tensors(cfg: ModelConfig, model_type: str) -> dict[str, Tensor]:
    """Meta tensors named and shaped as a hub-layout checkpoint of ``cfg`` must hold them."""
    return to_hf_state_dict(meta_state_dict(cfg), cfg, model_type)


@dataclass(frozen=True)
class Piece:
    """Where one tensor comes from: ``tensors[name][index]`` of a checkpoint (``index`` picks one
    expert of a fused tensor, and gate or up rows of ``gate_up_proj``, strided for gpt-oss's
    interleaved columns; empty: the whole tensor), its last two dims swapped when ``transpose``
    (the ``[in, out]`` fused tensors of ``HFLayout.fused`` types).

    Loading in one process reads whole tensors and indexes them; sharded loading
    (``moekit.parallel.loading``) reads only the slice of a piece it holds."""

    name: str
    index: tuple[int | slice, ...] = ()
    transpose: bool = False


# A moekit state-dict key's source: one piece, or (stacked routed experts) one piece per expert.
Source = Piece | list[Piece]


def _hub_pieces(
    tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor], cfg: ModelConfig, lay: HFLayout
) -> dict[str, Piece]:
    """Hub name -> where the checkpoint holds it, reading transformers 5's in-memory layout too.

    transformers 5 names Mixtral's sparse block ``mlp`` (not ``block_sparse_moe``) and fuses
    experts into ``experts.gate_up_proj [E, 2F, D]`` (gate rows, then up rows) and
    ``experts.down_proj [E, D, F]``; a raw ``state_dict()`` of such a model has those names.
    """
    out: dict[str, Piece] = {}
    alias = re.compile(r"model\.layers\.(\d+)\.mlp\.")
    fused = re.compile(rf"model\.layers\.(\d+)\.{lay.moe}\.experts\.(gate_up_proj|down_proj)")
    for source, t in tensors.items():
        name = source
        m = alias.match(name)
        if m is not None and lay.moe != "mlp" and cfg.is_moe_layer(int(m.group(1))):
            name = f"model.layers.{m.group(1)}.{lay.moe}.{name[m.end() :]}"
        m = fused.fullmatch(name) if lay.fused is None else None  # fused-only types keep their names
        if m is None:
            out[name] = Piece(source)
            continue
        layer = int(m.group(1))
        names = expert_names(layer, cfg.moe.n_routed_experts if cfg.moe else 0, lay)
        if not names or names[0][0] not in expected:
            raise CheckpointError(f"unexpected tensor {source!r}: layer {layer} has no routed experts")
        f, d = expected[names[0][0]].shape
        want = (len(names), 2 * f, d) if m.group(2) == "gate_up_proj" else (len(names), d, f)
        if tuple(t.shape) != want:
            raise CheckpointError(f"tensor {source!r} has shape {tuple(t.shape)}, expected {want}")
        for j, (gate, up, down) in enumerate(names):
            if m.group(2) == "gate_up_proj":
                out[gate], out[up] = Piece(source, (j, slice(0, f))), Piece(source, (j, slice(f, 2 * f)))
            else:
                out[down] = Piece(source, (j,))
    return out


def resolve(tensors: Mapping[str, Tensor], piece: Piece) -> Tensor:
    """The tensor a piece names (a view when it only picks whole rows or blocks; contiguous when
    it strides or transposes, as parameters must be)."""
    t = tensors[piece.name]
    t = t[piece.index] if piece.index else t
    strided = any(isinstance(i, slice) and (i.step or 1) != 1 for i in piece.index)
    return t.transpose(-1, -2).contiguous() if piece.transpose else t.contiguous() if strided else t


def _fused_pieces(name: str, kept: Mapping[str, Tensor], lay: HFLayout) -> Piece:
    """The moekit expert tensor ``name`` (``layers.{i}.ffn.experts.w1`` ... ``b2``) of a fused-only
    type as one piece of its ``gate_up_proj [E, D, 2F]`` / ``down_proj [E, F, D]`` (or their
    ``_bias``): gate and up columns interleaved (gpt-oss: even, odd) or concatenated (Llama 4)."""
    m = re.fullmatch(_L + r"ffn\.experts\.(w1|w3|w2|b1|b3|b2)", name)
    assert m is not None
    base, which = f"model.layers.{m.group(1)}.{lay.moe}.experts.", m.group(2)
    if which in ("w2", "b2"):
        return Piece(base + ("down_proj" if which == "w2" else "down_proj_bias"), transpose=which == "w2")
    fused = base + ("gate_up_proj" if which in ("w1", "w3") else "gate_up_proj_bias")
    two_f = kept[fused].shape[-1]
    up = which in ("w3", "b3")
    cols = (
        slice(int(up), two_f, 2)
        if lay.fused == "interleaved"
        else slice(two_f // 2, two_f)
        if up
        else slice(0, two_f // 2)
    )
    lead = (slice(None),) * (kept[fused].dim() - 1)
    return Piece(fused, (*lead, cols), transpose=which in ("w1", "w3"))


def check_tensors(tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor], what: str = "checkpoint") -> None:
    """Strict: every expected tensor present with its exact shape, nothing else."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
        raise CheckpointError(f"{what} does not match the config: " + "; ".join(parts))
    for k, want in expected.items():
        got = tensors[k]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"{what}: tensor {k!r} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        if not got.is_floating_point():
            raise CheckpointError(f"{what}: tensor {k!r} has dtype {got.dtype}, expected a floating-point tensor")


def prepare_hf_tensors(
    tensors: Mapping[str, Tensor], cfg: ModelConfig, model_type: str, ignore: Callable[[str], bool] | None = None
) -> dict[str, Tensor]:
    """The checkpoint's tensors under the names ``hf_sources``' pieces use: those ``ignore`` names
    dropped, then the type's ``HFLayout.from_file`` rewrite (renames, and views split from fused
    file tensors). Without a rewrite, the checkpoint's own names."""
    lay = layout(model_type)
    kept = {k: v for k, v in tensors.items() if not (ignore and ignore(k))}
    return lay.from_file(kept, cfg) if lay.from_file is not None else kept


def hf_sources(
    tensors: Mapping[str, Tensor],
    cfg: ModelConfig,
    model_type: str,
    ignore: Callable[[str], bool] | None = None,
    what: str = "checkpoint",
) -> dict[str, Source]:
    """Where each tensor of a moekit state dict comes from in HF ``tensors`` (hub or fused layout;
    meta tensors suffice), checked strictly: every expected tensor present with its shape. The
    pieces name tensors of ``prepare_hf_tensors(tensors, ...)``: of the files themselves unless the
    type rewrites them (``HFLayout.from_file``).

    ``ignore`` drops names the model does not use (say, DeepSeek-V3's multi-token-prediction
    layers). A tied ``lm_head.weight`` in the checkpoint is accepted and ignored, as transformers does.
    Raises ``CheckpointError`` naming the first missing, unexpected or misshapen tensor.
    """
    lay = layout(model_type)
    meta = meta_state_dict(cfg)
    expected = to_hf_state_dict(meta, cfg, model_type, standard=True)
    kept = prepare_hf_tensors(tensors, cfg, model_type, ignore)
    if cfg.tie_embeddings and "lm_head.weight" in kept and "lm_head.weight" not in expected:
        del kept["lm_head.weight"]
    pieces = _hub_pieces(kept, expected, cfg, lay)
    check_tensors({name: resolve(kept, p) for name, p in pieces.items()}, expected, what)
    out: dict[str, Source] = {}
    for name in meta:
        if lay.fused is not None and (_EXPERTS.fullmatch(name) or _EXPERT_BIAS.fullmatch(name)):
            out[name] = _fused_pieces(name, kept, lay)
            continue
        m = _EXPERTS.fullmatch(name)
        if m is not None:  # one [F, D] / [D, F] piece per expert, stacked along dim 0
            layer, w = int(m.group(1)), _W_INDEX[m.group(2)]
            per_expert = expert_names(layer, cfg.moe.n_routed_experts if cfg.moe else 0, lay)
            out[name] = [pieces[n[w]] for n in per_expert]
        elif name == "lm_head.weight" and cfg.tie_embeddings:
            out[name] = pieces["model.embed_tokens.weight"]
        else:
            out[name] = pieces[hf_name(name, lay, model_type)]
    return out


def from_hf_state_dict(
    tensors: Mapping[str, Tensor],
    cfg: ModelConfig,
    model_type: str,
    ignore: Callable[[str], bool] | None = None,
    what: str = "checkpoint",
) -> dict[str, Tensor]:
    """HF tensors (hub or fused layout) -> a complete moekit state dict (see ``hf_sources``)."""
    sources = hf_sources(tensors, cfg, model_type, ignore, what)
    named = prepare_hf_tensors(tensors, cfg, model_type, ignore)
    return {
        name: torch.stack([resolve(named, p) for p in src]) if isinstance(src, list) else resolve(named, src)
        for name, src in sources.items()
    }


__all__ = [
    "LAYOUTS",
    "CheckpointError",
    "HFLayout",
    "Piece",
    "Source",
    "UnsupportedError",
    "check_tensors",
    "expected_hf_tensors",
    "from_hf_state_dict",
    "hf_name",
    "hf_sources",
    "layout",
    "meta_state_dict",
    "prepare_hf_tensors",
    "resolve",
    "to_hf_state_dict",
]
