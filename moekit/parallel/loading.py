"""Sharded loading: each rank reads only the tensors it holds from a checkpoint folder.

``load_sharded(path, layout)`` is ``from_pretrained`` followed by ``parallelize``, without ever
holding the whole model: every rank
1. checks the folder on its headers (``moekit.interop.pretrained.open_checkpoint``: names, shapes,
   config options, every file inside the folder, a tied head's shape; no data read);
2. builds the model on the meta device and ``parallelize``s it there, which slices the expert
   tensors' shapes to this rank's block of global experts and its ``F/etp`` columns;
3. reads from the safetensors files (``safe_open(...).get_slice``, memory-mapped: pages it does
   not index are never touched) the replicated tensors whole and, of every routed-expert tensor,
   only its own experts' slices: for each local expert its w1/w3 rows and w2 columns, from the
   per-expert hub tensors, the fused ``gate_up_proj``/``down_proj`` of transformers 5, or a moekit
   folder's stacked ``[E, F, D]`` tensors, and the strided, transposed ``[in, out]`` fused tensors
   of gpt-oss and Llama 4 alike (``moekit.interop.hf_weights.Piece``); a type whose files are
   rewritten at load (``HFLayout.from_file``) is read through the rewrite, or refused in one line
   where its routed experts are not file tensors (``check_readable``: DBRX);
   (a tied config's distinct head tensor, if the folder has one, is read to check it equals the
   embedding, as ``from_pretrained`` does);
4. adopts them (no copy) and moves the model to ``device``.
So a rank's peak memory is its share of the experts plus the replicated part, plus one expert's
slice in flight; ``model.load_report`` says how many bytes it read.

Errors never hang: every step that could fail on one rank alone runs in ``together``, where
ranks exchange their errors (one ``all_gather_object``) and every rank raises the first failing
rank's error, so none is left waiting in a collective.

Shapes: E experts (global), F expert width, D model width.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch import Tensor

from moekit.errors import CheckpointError, MoekitError
from moekit.interop.hf_weights import Piece, UnsupportedError, resolve
from moekit.interop.pretrained import Checkpoint, _assemble, _resolve_dtype, finish_loading, open_checkpoint
from moekit.interop.safety import check_tied_head
from moekit.models.transformer import MoETransformer
from moekit.parallel.apply import F_AXIS, expert_shards, parallelize
from moekit.parallel.groups import ProcessGroups
from moekit.parallel.layout import Layout

T = TypeVar("T")


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def together(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raises on any rank, every rank raises (the lowest failing
    rank's error: the same class and message, naming that rank on the others). Collective."""
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 (any failure must reach the other ranks, or they hang)
        error = e
    if _world() > 1:
        errors: list[Any] = [None] * _world()
        mine = None if error is None else (type(error), str(error))
        try:
            dist.all_gather_object(errors, mine)
        except Exception:  # noqa: BLE001 (an exception class that does not pickle)
            dist.all_gather_object(errors, None if error is None else (CheckpointError, str(error)))
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed and error is None:
            rank, (kind, message) = failed[0]
            kind = kind if isinstance(kind, type) and issubclass(kind, MoekitError) else CheckpointError
            raise kind(f"{message} (on rank {rank})")
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


@dataclass
class LoadReport:
    """What one rank read: tensor bytes from the files, against the whole checkpoint's."""

    bytes_read: int
    expert_bytes_read: int
    checkpoint_bytes: int  # every tensor the model uses, as stored
    checkpoint_expert_bytes: int  # the routed experts' share of it
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _compose(piece: Piece, sub: tuple, shape: tuple[int, ...]) -> tuple:
    """One index into the stored tensor (of ``shape``) equal to ``resolve(piece)[sub]`` before the
    piece's transpose, so the slice of a piece is read from the file in one go. ``piece.index``
    holds ints and slices (strided too: interleaved gate/up columns); ``sub`` ints and unit-step
    slices, in the piece's own dim order (after its transpose)."""
    prefix = (*piece.index, *[slice(None)] * (len(shape) - len(piece.index)))
    n_out = sum(not isinstance(p, int) for p in prefix)
    sub = [*sub, *[slice(None)] * (n_out - len(sub))]
    if piece.transpose:
        sub[-2], sub[-1] = sub[-1], sub[-2]
    out: list[int | slice] = []
    rest = iter(sub)
    for p, size in zip(prefix, shape, strict=True):
        if isinstance(p, int):
            out.append(p)
            continue
        start, stop, step = p.indices(size)
        s = next(rest)
        if isinstance(s, int):
            out.append(start + s * step)
            continue
        assert (s.step or 1) == 1, s
        s_start, s_stop = s.start or 0, s.stop
        out.append(slice(start + s_start * step, stop if s_stop is None else min(start + s_stop * step, size), step))
    return tuple(out)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class _Reader:
    """Reads pieces (or slices of them) from the checkpoint's files, counting bytes.

    A type that rewrites its files at load (``Checkpoint.rewrite``: ``HFLayout.from_file``) names
    pieces after the rewrite: a renamed tensor is read under its file name; a view split from a
    fused file tensor (DBRX's ``Wqkv``, Granite's shared ``input_linear``) is read by reading that
    tensor whole and taking the same view (``as_strided``) of it, so only replicated tensors may
    be such views (``check_readable`` refuses the rest before anything is read).

    NOTE: safetensors memory-maps a file while it is open, and every page a slice touches stays
    resident until it is closed (a column slice of ``w2 [D, F]`` touches every row's pages), so
    ``release`` closes the files after each state-dict key: the touched pages of one key at most
    add to the rank's peak, not those of the whole checkpoint.
    """

    def __init__(self, ckpt: Checkpoint):
        self.headers = ckpt.headers
        self.files = ExitStack()
        self.open: dict[Path, Any] = {}
        self.bytes_read = 0
        self.renamed, self.views = _through_rewrite(ckpt)
        self.whole: dict[str, Tensor] = {}  # fused file tensors read whole for views, until release

    def read(self, piece: Piece, sub: tuple = ()) -> Tensor:
        if piece.name in self.views:
            file_name, size, stride, offset = self.views[piece.name]
            if file_name not in self.whole:
                self.whole[file_name] = self.read(Piece(file_name))
            view = self.whole[file_name].as_strided(size, stride, offset)
            return resolve({piece.name: view}, piece)[sub].contiguous()
        name = self.renamed.get(piece.name, piece.name)
        path, meta = self.headers[name]
        try:
            if path not in self.open:
                self.open[path] = self.files.enter_context(safe_open(path, framework="pt"))
            f = self.open[path]
            if not piece.index and not sub:
                t = f.get_tensor(name)
            else:
                t = f.get_slice(name)[_compose(piece, sub, tuple(meta.shape))]
            t = t.transpose(-1, -2).contiguous() if piece.transpose else t
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {path}: {e}") from None
        self.bytes_read += _nbytes(t)
        return t

    def release(self) -> None:
        self.files.close()
        self.files, self.open, self.whole = ExitStack(), {}, {}


def _through_rewrite(ckpt: Checkpoint) -> tuple[dict[str, str], dict[str, tuple]]:
    """For a type that rewrites its files: rewritten name -> file name (tensors only renamed), and
    rewritten name -> (file name, size, stride, offset) (views of one file tensor). Found by
    running the rewrite on the headers' meta tensors: a renamed tensor is the same object, a view
    keeps its base (meta tensors carry strides and offsets)."""
    if ckpt.rewrite is None:
        return {}, {}
    origin = {id(t): name for name, (_, t) in ckpt.headers.items()}
    renamed: dict[str, str] = {}
    views: dict[str, tuple] = {}
    for name, t in ckpt.named.items():
        if id(t) in origin:
            renamed[name] = origin[id(t)]
        elif t._base is not None and id(t._base) in origin:
            views[name] = (origin[id(t._base)], tuple(t.shape), t.stride(), t.storage_offset())
    return renamed, views


def check_readable(ckpt: Checkpoint, expert_keys: Iterable[str]) -> None:
    """Refuse, in one line, a type whose rewrite builds a tensor this rank must read in a way the
    reader cannot: a sharded routed-expert tensor that is not a (renamed) file tensor (DBRX's
    experts, split from one fused tensor), or any tensor that is not a view of one file tensor."""
    if ckpt.rewrite is None:
        return
    renamed, views = _through_rewrite(ckpt)
    sharded = set(expert_keys)
    for key, src in ckpt.sources.items():
        for p in src if isinstance(src, list) else [src]:
            if p.name in renamed or (p.name in views and key not in sharded):
                continue
            mt = (ckpt.raw or {}).get("model_type")
            raise UnsupportedError(
                f"{ckpt.folder}: sharded loading cannot read model_type {mt}: its {p.name!r} is rebuilt at load "
                "from fused file tensors, not sliceable from the files; load it in one process, or convert it "
                "once (moekit convert SRC DST --format moekit) and load that folder sharded"
            )


def _expert_index(name: str, shard, per_expert: bool) -> tuple:
    """This rank's part of one expert tensor: ``[its experts, ..., its F columns]`` of the stacked
    tensor, or ``[..., its F columns]`` of one expert's ``[F, D]`` / ``[D, F]`` piece."""
    f_axis = F_AXIS[name]
    lead = () if per_expert else (shard.experts,)
    if f_axis is None:
        return lead
    f_axis -= 1 if per_expert else 0
    return (*lead, *[slice(None)] * (f_axis - len(lead)), shard.ffn)


def _read_local(ckpt: Checkpoint, model: MoETransformer, dtype: torch.dtype) -> tuple[dict[str, Tensor], int, int]:
    """This rank's state dict (its expert slices, everything else whole), the expert bytes and
    all bytes read."""
    experts = {f"{prefix}.{name}": (name, ex.shard) for prefix, ex in expert_shards(model) for name in F_AXIS}
    check_readable(ckpt, experts)
    sd: dict[str, Tensor] = {}
    expert_bytes = 0
    reader = _Reader(ckpt)
    try:
        for key, src in ckpt.sources.items():
            if key == "lm_head.weight" and ckpt.config.tie_embeddings:
                continue  # the embedding, read once
            before = reader.bytes_read
            if key not in experts:  # replicated, or the experts of a model not sharded (one process)
                sd[key] = torch.stack([reader.read(p) for p in src]) if isinstance(src, list) else reader.read(src)
                if ".ffn.experts." in key:
                    expert_bytes += reader.bytes_read - before
                continue
            name, shard = experts[key]
            if isinstance(src, Piece):  # a stacked [E, ...] tensor: one read of the block
                sd[key] = reader.read(src, _expert_index(name, shard, per_expert=False))
            else:  # one piece per expert: fill the local stack expert by expert (one slice in flight)
                ids = range(shard.experts.start, shard.experts.stop)
                first = reader.read(src[ids[0]], _expert_index(name, shard, per_expert=True))
                out = torch.empty((len(ids), *first.shape), dtype=dtype)  # cast as it is filled
                out[0].copy_(first)
                del first
                for i, e in enumerate(ids[1:], start=1):
                    out[i].copy_(reader.read(src[e], _expert_index(name, shard, per_expert=True)))
                sd[key] = out
            expert_bytes += reader.bytes_read - before
            reader.release()
        if ckpt.config.tie_embeddings:  # a distinct head beside a tied config: refused as in one process
            heads = [k for k in ckpt.headers if k == "lm_head.weight" or k.endswith(".lm_head.weight")]
            if heads:
                head = {heads[0]: reader.read(Piece(heads[0])), "embed.weight": sd["embed.weight"]}
                check_tied_head(head, True, str(ckpt.folder))
                del head
    finally:
        reader.release()
    total = reader.bytes_read
    if ckpt.config.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    return sd, expert_bytes, total


def _checkpoint_bytes(ckpt: Checkpoint) -> tuple[int, int]:
    """All stored bytes the model uses, and the routed experts' part (from the headers)."""
    meta = ckpt.named
    total = experts = 0
    for key, src in ckpt.sources.items():
        if key == "lm_head.weight" and ckpt.config.tie_embeddings:
            continue
        pieces = src if isinstance(src, list) else [src]
        n = sum(_nbytes(resolve(meta, p)) for p in pieces)
        total += n
        experts += n if ".ffn.experts." in key else 0
    return total, experts


def load_sharded(
    path: str | Path,
    layout: Layout,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    groups: ProcessGroups | None = None,
) -> MoETransformer:
    """Load a Hugging Face or moekit checkpoint folder (or a run directory) already parallelised
    for ``layout``, each rank reading only the expert tensors it holds. Call it on every rank.

    The result equals ``parallelize(from_pretrained(path), layout)`` (eval mode, tokenizer and
    generation defaults attached), plus ``model.load_report`` (a ``LoadReport``). In one process
    (``Layout()``) it is ``from_pretrained``. Errors are ``MoekitError`` s raised on every rank.
    """
    t0 = time.perf_counter()
    target = _resolve_dtype(dtype)
    ckpt = together(lambda: open_checkpoint(path))
    cfg = ckpt.config
    moe = cfg.moe
    together(
        lambda: layout.validate(_world(), moe.n_routed_experts if moe else None, moe.expert_ffn_dim if moe else None)
    )
    with torch.device("meta"):
        model = MoETransformer(cfg)
    parallelize(model, layout, groups)  # on meta: the expert shapes become this rank's slices
    load_dtype = target or ckpt.dtype
    sd, expert_bytes, total = together(lambda: _read_local(ckpt, model, load_dtype))
    model = _assemble(cfg, sd, load_dtype, model)  # buffers (a selection bias) stay fp32
    model.to(device)
    ckpt_bytes, ckpt_expert_bytes = _checkpoint_bytes(ckpt)
    model.load_report = LoadReport(total, expert_bytes, ckpt_bytes, ckpt_expert_bytes, time.perf_counter() - t0)
    return together(lambda: finish_loading(model, ckpt))


__all__ = ["LoadReport", "load_sharded", "together"]
