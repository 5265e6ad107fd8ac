"""Run under ``torchrun --nproc-per-node W dist_cases.py OUT.json [ROOT]``: every layout of world
size W against one process on the same global batch, in fp32; rank 0 writes the measured errors.
With ROOT (folders written by ``prepare_loading.py``) it also runs ``dist_loading.py``'s
checkpoint, sharded-loading, inference and resume cases.

One launch loops over all cases (spawning processes costs ~25 s here); ``test_equivalence.py``
asserts on the JSON. Errors are per-tensor ``|a - b| / |b|`` (absolute when ``b`` is 0).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moekit.balancing import balance_terms, chosen_counts, update_selection_bias
from moekit.config import AttentionConfig, ModelConfig, MoEConfig
from moekit.models.transformer import MoETransformer
from moekit.parallel import (
    Layout,
    all_reduce_sum,
    clip_grad_norm_,
    full_gradients,
    full_state_dict,
    parallelize,
    rank_parameters,
    sync_gradients,
)
from moekit.planning import rank_parameter_split

sys.path.insert(0, str(Path(__file__).parent))
from dist_train_cases import run_train_cases  # noqa: E402 (this folder is no package)

B, S = 8, 6  # global batch


def model_cfg(**moe) -> ModelConfig:
    kw = dict(
        n_routed_experts=8,
        top_k=2,
        expert_ffn_dim=8,
        aux_loss_coef=0.01,
        device_loss_coef=0.01,
        n_devices=2,
        z_loss_coef=0.001,
    )
    kw.update(moe)
    return ModelConfig(
        vocab_size=64,
        d_model=16,
        n_layers=2,
        dense_ffn_dim=32,
        attention=AttentionConfig(n_heads=2),
        moe=MoEConfig(**kw),
        name="dist-test",
    )


SHARED = dict(n_shared_experts=1)
SIGMOID = dict(
    score_func="sigmoid",
    n_group=4,
    topk_group=2,
    norm_topk_prob=True,
    routed_scaling_factor=2.0,
    aux_free_rate=0.01,
    seq_aux_loss_coef=0.001,
    aux_loss_coef=0.0,
    device_loss_coef=0.0,
)
# Llama 4's gate weights on the experts' input (through the dispatcher) with gpt-oss's clamped
# SwiGLU (autograd, not the fused path's hand-written backward); a low limit so the clamp bites.
LLAMA4_GPT_OSS = dict(SHARED, scale_expert_input=True, expert_activation="clamped_swiglu", swiglu_limit=0.5)
# (name, layout, moe overrides, expert ids whose router bias is -100 so that no token picks them)
CASES = {
    2: [
        ("dp2", Layout(dp=2), SHARED, ()),
        ("dp2-ep2", Layout(dp=2, ep=2), SHARED, ()),
        ("dp2-ep2-sigmoid-groups-auxfree", Layout(dp=2, ep=2), SIGMOID, ()),
        ("etp2", Layout(dp=1, etp=2), SHARED, ()),
        ("etp2-sigmoid-groups-auxfree", Layout(dp=1, etp=2), SIGMOID, ()),
        (
            "dp2-ep2-hash",
            Layout(dp=2, ep=2),
            dict(router="hash", aux_loss_coef=0.0, device_loss_coef=0.0, z_loss_coef=0.0),
            (),
        ),
        ("dp2-ep2-input-scaled-clamped", Layout(dp=2, ep=2), LLAMA4_GPT_OSS, ()),
        ("etp2-input-scaled-clamped", Layout(dp=1, etp=2), LLAMA4_GPT_OSS, ()),
        ("dp2-ep2-zero-token-expert", Layout(dp=2, ep=2), dict(router_bias=True), (0,)),
        ("dp2-ep2-zero-token-rank", Layout(dp=2, ep=2), dict(router_bias=True), (4, 5, 6, 7)),
    ],
    4: [
        ("dp4-ep4", Layout(dp=4, ep=4), SHARED, ()),
        ("dp4-ep2", Layout(dp=4, ep=2), SHARED, ()),
        ("dp2-etp2-ep2", Layout(dp=2, ep=2, etp=2), SHARED, ()),
        ("dp2-etp2-ep2-sigmoid-groups-auxfree", Layout(dp=2, ep=2, etp=2), SIGMOID, ()),
    ],
}
CAPACITY = {2: ("dp2-ep2-capacity", Layout(dp=2, ep=2)), 4: ("dp2-etp2-ep2-capacity", Layout(dp=2, ep=2, etp=2))}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    nb = b.norm()
    return float((a - b).norm() / nb) if nb > 0 else float((a - b).norm())


def build(cfg: ModelConfig, unpicked: tuple[int, ...]) -> MoETransformer:
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    if unpicked:
        with torch.no_grad():
            for block in model.layers:
                if block.is_moe:
                    block.ffn.router.gate.bias[list(unpicked)] = -100.0
    return model


def step_loss(model, ids, moe, reduce=None):
    """Forward; the training objective; the embedding output (to read the input gradient)."""
    seen = {}

    def keep(module, inputs, output):
        seen["x"] = output

    handle = model.embed.register_forward_hook(keep)
    out = model(ids, labels=ids)
    handle.remove()
    seen["x"].retain_grad()
    terms = balance_terms(out.routing, moe, reduce)
    return out, out.loss + sum(terms.values()), seen["x"]


def run_case(name, layout, moe_kw, unpicked, rank, world) -> dict:
    cfg = model_cfg(**moe_kw)
    moe = cfg.moe
    ref = build(cfg, unpicked)
    par = parallelize(copy.deepcopy(ref), layout)
    coords = layout.coords(rank)
    b = B // layout.dp
    rows = slice(coords.dp_index * b, (coords.dp_index + 1) * b)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt_par = torch.optim.AdamW(par.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    res: dict = {"losses": []}
    for step in range(3):
        ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
        out_r, loss_r, x_r = step_loss(ref, ids, moe)
        dispatchers = [b.ffn.dispatcher for b in par.layers if b.is_moe]
        for d in dispatchers:
            if hasattr(d, "stats"):
                d.stats.reset()
        out_p, loss_p, x_p = step_loss(par, ids[rows], moe, all_reduce_sum)
        if step == 0 and layout.ep > 1:  # forward bytes: rows to other ranks' experts, and their outputs back
            es = par.layers[0].ffn.experts.shard.experts
            off_rank = sum(int(r.counts_E.sum() - r.counts_E[es].sum()) for r in out_p.routing)
            sent = all_reduce_sum(torch.tensor(float(sum(d.stats.bytes_sent for d in dispatchers))))
            expected = all_reduce_sum(torch.tensor(2.0 * off_rank * cfg.d_model * 4))
            res["a2a_bytes"] = [float(sent), float(expected)]
        for opt in (opt_ref, opt_par):
            opt.zero_grad(set_to_none=True)
        loss_r.backward()
        loss_p.backward()
        sync_gradients(par)
        global_loss = all_reduce_sum(loss_p.detach()) / world
        res["losses"].append([float(loss_r), float(global_loss)])
        if step == 0:
            res["logits"] = rel(out_p.logits.detach(), out_r.logits.detach()[rows])
            res["input_grad"] = rel(x_p.grad / layout.dp, x_r.grad[rows])
            gr, gp = full_gradients(ref), full_gradients(par)
            res["grads"] = {n: rel(gp[n], gr[n]) for n in gr}
            res["none_grads"] = sorted(n for n, p in par.named_parameters() if p.grad is None)
            if unpicked:  # their experts' gradients must be exactly zero (and present)
                zero = []
                for n, grad in gp.items():
                    if n.endswith(("experts.w1", "experts.w3", "experts.w2")):
                        zero.append(float(grad[list(unpicked)].abs().max()))
                res["unpicked_grad_max"] = max(zero)
        n_ref = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0))
        n_par = float(clip_grad_norm_(par, 1.0))
        res.setdefault("grad_norm", []).append([n_ref, n_par])
        opt_ref.step()
        opt_par.step()
        if moe.aux_free_rate > 0:
            update_selection_bias(ref, out_r.routing)
            update_selection_bias(par, [all_reduce_sum(chosen_counts(r)[0]) for r in out_p.routing])
    # What each rank holds: everything but the routed experts, plus 1/(ep*etp) of them.
    experts = sum(p.numel() for n, p in ref.named_parameters() if ".experts." in n)
    expected = sum(p.numel() for p in ref.parameters()) - experts + experts // (layout.ep * layout.etp)
    res["rank_params"] = [rank_parameters(par)["params"], expected]
    held = rank_parameters(par)  # ... and what moekit.planning counts for this rank
    res["planned_params"] = [
        [held["replicated_params"], held["expert_params"]],
        list(rank_parameter_split(cfg, layout)),
    ]
    sd_ref, sd_par = ref.state_dict(), full_state_dict(par)
    res["params_after"] = max(rel(sd_par[k], sd_ref[k]) for k in sd_ref)
    return res


def run_capacity(name, layout, rank) -> dict:
    """Capacity is per local micro-batch: each rank drops what one process drops on its rows."""
    cfg = model_cfg(capacity_factor=1.0, **SHARED)
    ref = build(cfg, ())
    par = parallelize(copy.deepcopy(ref), layout)
    b = B // layout.dp
    c = layout.coords(rank)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(2))[
        c.dp_index * b : (c.dp_index + 1) * b
    ]
    out_r, out_p = ref(ids, labels=ids), par(ids, labels=ids)
    same_keep = all(torch.equal(a.keep_TK, r.keep_TK) for a, r in zip(out_p.routing, out_r.routing, strict=True))
    dropped = sum(int((~r.keep_TK).sum()) for r in out_p.routing)
    return {"same_keep": same_keep, "dropped": dropped, "logits": rel(out_p.logits, out_r.logits)}


PLANNED = {  # more shapes for the planning cross-check: dense first layer, tied embeddings, expert biases
    "shared+dense": ModelConfig(
        vocab_size=97, d_model=32, n_layers=3, attention=AttentionConfig(n_heads=4, n_kv_heads=2), dense_ffn_dim=48,
        moe=MoEConfig(n_routed_experts=8, top_k=2, expert_ffn_dim=24, n_shared_experts=1, first_k_dense=1),
    ),
    "tied": ModelConfig(
        vocab_size=64, d_model=16, n_layers=2, attention=AttentionConfig(n_heads=4), dense_ffn_dim=32,
        moe=MoEConfig(n_routed_experts=8, top_k=2, expert_ffn_dim=12), tie_embeddings=True,
    ),
    "expert-bias": ModelConfig(
        vocab_size=64, d_model=16, n_layers=2, attention=AttentionConfig(n_heads=4, sinks=True), dense_ffn_dim=32,
        moe=MoEConfig(n_routed_experts=8, top_k=2, expert_ffn_dim=12, router_bias=True, expert_bias=True),
    ),
}  # fmt: skip


def planned_counts(world: int) -> dict:
    """Each layout of this world's cases on more model shapes: [held, planned] (replicated, expert)."""
    out = {}
    for layout in dict.fromkeys(c[1] for c in CASES[world]):
        for name, cfg in PLANNED.items():
            if cfg.moe.expert_bias and layout.etp > 1:
                continue  # moekit.parallel refuses etp with expert biases
            torch.manual_seed(0)
            held = rank_parameters(parallelize(MoETransformer(cfg), layout))
            planned = rank_parameter_split(cfg, layout)
            out[f"{name} {layout.text()}"] = [[held["replicated_params"], held["expert_params"]], list(planned)]
    return out


def run_loading_cases(root: Path, world: int) -> dict:
    """``dist_loading.py``'s cases on the folders ``prepare_loading.py`` wrote under ``root``."""
    import dist_loading as cases  # beside this script (torchrun puts its folder on sys.path)

    out = {
        "sharded_hf": cases.sharded_hf(root, world),
        "bad_folders": cases.bad_folders(root, world),
        "cli_generate": cases.cli_generate(root, world),
    }
    if world == 2:

        def batch():
            return torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(4))

        out["expert_placement"] = cases.expert_placement(root, world, model_cfg, build, batch)
    if world == 4:
        out["resume"] = cases.resume_across_layouts(root, world)
    return out


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    loading = run_loading_cases(Path(sys.argv[2]), world) if len(sys.argv) > 2 else {}
    results = {}
    for name, layout, moe_kw, unpicked in CASES[world]:
        results[name] = run_case(name, layout, moe_kw, unpicked, rank, world)
    cap_name, cap_layout = CAPACITY[world]
    per_rank = [None] * world
    dist.all_gather_object(per_rank, run_capacity(cap_name, cap_layout, rank))
    results[cap_name] = per_rank
    per_rank = [None] * world
    dist.all_gather_object(per_rank, planned_counts(world))
    results["planned"] = per_rank
    if world == 2:  # the training loop's collective guarantees (dist_train_cases.py)
        per_rank = [None] * world
        dist.all_gather_object(per_rank, run_train_cases(rank, world, Path(sys.argv[1]).parent / "train"))
        results["train"] = per_rank
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"equivalence": results, "loading": loading}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
