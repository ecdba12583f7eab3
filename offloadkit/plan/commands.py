"""``offloadkit plan``: a policy's plan for one model on one machine, in words, and as a JSON file.

It exists so that a plan can be read before it is run: how much of every block kind and every layer is
resident on the GPU (GG), which experts a Mixture-of-Experts plan keeps there and how much of the routed
work they serve, what the plan holds in GPU and host memory, and the tokens/s it is predicted to reach
in each phase beside the bound no placement beats. Every figure is **simulated** on the named profile
and says so. ``--out`` writes the plan (:mod:`offloadkit.plan.plan_io`) for ``simulate --plan``.

The pieces ``offloadkit simulate`` shares with it live here too: the options that name a case (model,
profile, workload, routing), their checks (refused before any work, one line each), and the
:class:`~offloadkit.runtime.compare.Comparison` of one plan with the bounds, whose rows ``--json``
writes. Heavy modules (torch, SciPy) are imported inside the handlers, so ``offloadkit --help`` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from offloadkit.errors import OffloadkitError
from offloadkit.output_paths import check_output_file

#: The policies of :data:`offloadkit.plan.policies.POLICIES` (a test keeps them equal; that module is not
#: imported here because it imports torch, which would make ``--help`` slow).
POLICY_NAMES: tuple[str, ...] = ("scheinfer", "llamacpp", "fiddler", "ktransformers", "cpu-only", "gpu-only")
#: What each assignment rule does with host rows, in words.
RULE_WORDS = {
    "cpu": "host rows always run on the CPU (CC); nothing is streamed",
    "threshold": "host rows of an op of >= {n} tokens are copied to the GPU and run there (CG), else run on the CPU",
    "fiddler": "each non-resident expert runs whole on the CPU or is copied whole to the GPU, by Fiddler's latency "
               "rule",
    "balance": "ScheInfer's token assignment: at every step, host rows are split between the CPU (CC) and "
               "streaming to the GPU (CG) so that the lanes finish together",
}


# ---- the case: options, checks, loading ----------------------------------------------------------------

def add_case_arguments(p: argparse.ArgumentParser) -> None:
    """The options that name a case: ``--model --profile --prompt --gen --batch --routing --seed``."""
    p.add_argument("--model", default="mixtral-8x7b", help="a zoo name, 'demo', or a folder with config.json")
    p.add_argument("--profile", default="rtx4090-desktop",
                   help="a catalog profile name (see 'offloadkit hardware list') or a profile .toml")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence (the prefill)")
    p.add_argument("--gen", type=int, default=128,
                   help="generated tokens per sequence (decode steps); 0 simulates the prefill only")
    p.add_argument("--batch", type=int, default=1, help="sequences processed together")
    p.add_argument("--routing", default="uniform",
                   help="which experts tokens pick: uniform, zipf:S (skewed, e.g. zipf:1.2) or trace:PATH "
                        "(a recorded .npz, e.g. trace:demo-mixtral-pydoc.npz)")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic routing")


@dataclass
class Case:
    """One (model, profile, workload, routing), loaded and checked."""

    spec: Any
    profile: Any
    workload: Any
    routing: Any

    @property
    def routing_label(self) -> str:
        return getattr(self.routing, "label", "trace")


def check_workload_args(args: argparse.Namespace) -> None:
    """``--prompt`` and ``--batch`` >= 1, ``--gen`` >= 0, refused by their flag's name."""
    for flag, value, least in (("--prompt", args.prompt, 1), ("--gen", args.gen, 0), ("--batch", args.batch, 1)):
        if value < least:
            raise OffloadkitError(f"{flag} must be >= {least}, got {value}"
                                  + (" (--gen 0 simulates the prefill only)" if flag == "--gen" else ""))


def read_case(args: argparse.Namespace) -> Case:
    """Load the model, profile and routing the options name; a routing trace that does not match the model
    is refused here, before any planning or simulation."""
    from offloadkit.hardware.catalog import load_profile
    from offloadkit.model.zoo import load_spec
    from offloadkit.plan.plans import Workload
    from offloadkit.plan.routing import RoutingTrace, parse_routing

    check_workload_args(args)
    spec = load_spec(args.model)
    profile = load_profile(args.profile)
    workload = Workload(args.prompt, args.gen, args.batch)
    routing = parse_routing(args.routing, args.seed)
    if isinstance(routing, RoutingTrace):
        routing.check(spec)
    return Case(spec, profile, workload, routing)


def plan_comparison(case: Case, plan: Any, result: Any) -> Any:
    """A :class:`~offloadkit.runtime.compare.Comparison` of one simulated plan, with the phase bounds (where
    the profile has a GPU): its rows are those ``compare_policies`` gives, ``policy`` being the plan's."""
    from offloadkit.plan.bounds import workload_bounds
    from offloadkit.runtime.compare import Comparison, PolicyRun

    p = case.profile
    bounds = workload_bounds(case.spec, p, case.workload, case.routing) if p.gpu and p.link else {}
    return Comparison(case.spec.name or case.spec.arch, p.name, case.workload, case.routing_label,
                      {plan.policy: PolicyRun(plan.policy, plan, result)}, bounds)


# ---- the plan in words --------------------------------------------------------------------------------

def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _resident_bytes(spec: Any, plan: Any, block: Any) -> int:
    from offloadkit.plan.plans import units

    u = units(block)
    return spec.bytes_of(block.params) * min(plan.resident(block), u) // u


def kind_table(plan: Any, spec: Any) -> str:
    """GG rows and bytes per block kind, with the totals."""
    from offloadkit.hardware.commands import format_table
    from offloadkit.plan.plans import plan_blocks, units

    kinds: dict[str, list[int]] = {}  # kind -> [blocks, rows resident, rows, bytes resident, bytes]
    for b in plan_blocks(spec):
        k = kinds.setdefault(b.kind, [0, 0, 0, 0, 0])
        u = units(b)
        k[0] += 1
        k[1] += min(plan.resident(b), u)
        k[2] += u
        k[3] += _resident_bytes(spec, plan, b)
        k[4] += spec.bytes_of(b.params)
    rows = [[kind, str(n), f"{gg:,} / {total:,}", _pct(gg, total), f"{_gib(gb)} / {_gib(tb)}"]
            for kind, (n, gg, total, gb, tb) in kinds.items()]
    gb, tb = sum(k[3] for k in kinds.values()), sum(k[4] for k in kinds.values())
    rows.append(["all weights", str(sum(k[0] for k in kinds.values())), "", _pct(gb, tb), f"{_gib(gb)} / {_gib(tb)}"])
    return format_table(["block kind", "blocks", "rows resident (GG) / rows", "GG", "GiB on GPU / GiB"], rows,
                        [False, True, True, True, True])


def layer_table(plan: Any, spec: Any) -> str:
    """Per layer: share of attention rows and of FFN/expert rows resident, where the KV cache is, GiB on the
    GPU; runs of layers that read the same are one line (``L8-L31``)."""
    from offloadkit.hardware.commands import format_table

    rendered: list[tuple[int, tuple[str, ...]]] = []
    for layer in range(spec.n_layers):
        attn = [b for b in spec.layer_blocks(layer) if b.kind in ("attn_qkv", "attn_o")]
        ffn = [b for b in spec.layer_blocks(layer) if b.kind in ("ffn", "expert", "shared_expert")]

        def share(blocks: list[Any]) -> str:
            total = sum(b.rows for b in blocks)
            return _pct(sum(min(plan.resident(b), b.rows) for b in blocks), total)

        nbytes = sum(_resident_bytes(spec, plan, b) for b in spec.layer_blocks(layer))
        rendered.append((layer, (share(attn), share(ffn), "GPU" if plan.kv_on_gpu[layer] else "host",
                                 _gib(nbytes))))
    rows: list[list[str]] = []
    for layer, cells in rendered:
        if rows and rendered[layer - 1][1] == cells:
            first = rows[-1][0].split("-")[0]
            rows[-1][0] = f"{first}-L{layer}"
        else:
            rows.append([f"L{layer}", *cells])
    ffn_name = "experts" if spec.is_moe else "FFN"
    return format_table(["layers", "attention GG", f"{ffn_name} GG", "attention + KV on", "GiB on GPU"], rows,
                        [False, True, True, False, True])


def hot_experts(plan: Any, spec: Any, per_layer: int = 8) -> str:
    """The experts a MoE plan keeps (partly) resident per layer, hottest first, with their routing share
    (``plan.meta["expert_share"]``, where the plan records it) and the share of the routed work they serve."""
    share = plan.meta.get("expert_share")
    has_share = isinstance(share, list) and len(share) == spec.n_layers
    lines = []
    served = 0.0
    moe_layers = [layer for layer in range(spec.n_layers) if spec.is_moe_layer(layer)]
    rows = spec.expert_intermediate_size
    whole = partial = 0
    for layer in moe_layers:
        resident = [(e, min(plan.gg_rows.get(f"L{layer}.expert{e}", 0), rows) / rows) for e in range(spec.n_experts)]
        resident = [(e, f) for e, f in resident if f > 0]
        whole += sum(f == 1 for _, f in resident)
        partial += sum(f < 1 for _, f in resident)
        if has_share:
            s = share[layer]
            served += sum(s[e] * f for e, f in resident) / (spec.top_k * len(moe_layers))
            resident.sort(key=lambda ef: (-s[ef[0]], ef[0]))
            items = [f"e{e} {f:.0%} (share {s[e] / spec.top_k:.1%})" for e, f in resident]
        else:
            resident.sort(key=lambda ef: (-ef[1], ef[0]))
            items = [f"e{e} {f:.0%}" for e, f in resident]
        more = f", +{len(items) - per_layer} more" if len(items) > per_layer else ""
        lines.append(f"  L{layer}: " + (", ".join(items[:per_layer]) + more if items else "none"))
    head = (f"Experts resident (GG): {whole} whole and {partial} in part, of {spec.n_experts * len(moe_layers)}; "
            "per layer, e<expert> <rows resident>")
    if has_share:
        head += (f" (share: of the layer's routed tokens, from the plan's routing {plan.meta.get('routing', '?')}); "
                 f"the resident rows serve {served:.1%} of the routed expert work")
    else:
        head += " (the plan records no routing share: its experts are listed by rows resident)"
    return "\n".join([head, *lines])


def memory_lines(plan: Any, spec: Any, profile: Any, workload: Any) -> list[str]:
    """What the plan holds in GPU memory against usable memory, and in host memory against the host's."""
    from offloadkit.plan.host_memory import host_bytes_breakdown
    from offloadkit.plan.plans import gpu_bytes_breakdown

    out = []
    if plan.uses_gpu and profile.gpu is not None:
        parts = gpu_bytes_breakdown(plan, spec, workload)
        need, have = sum(parts.values()), profile.gpu.usable_memory_bytes
        detail = " + ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in parts.items())
        out.append(f"GPU memory: {detail} = {_gib(need)} GiB of {_gib(have)} GiB usable on {profile.name} "
                   f"({_pct(need, have)}; {_gib(have - need)} GiB free)")
    else:
        out.append("GPU memory: none (the plan does not use the GPU)")
    host = host_bytes_breakdown(plan, spec, workload)
    detail = " + ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in host.items())
    have_host = profile.cpu.memory_bytes
    where = (f"of {_gib(have_host)} GiB installed ({_pct(sum(host.values()), have_host)})" if have_host is not None
             else f"(host memory of {profile.name} unknown: not checked)")
    out.append(f"host memory: {detail} = {_gib(sum(host.values()))} GiB {where}")
    return out


def prediction_table(comparison: Any) -> str:
    """Tokens/s per phase, the bound, the fraction of the bound reached and the bounding lane."""
    from offloadkit.hardware.commands import format_table

    rows = []
    for row in comparison.rows():
        tps, bound, frac = row["tokens_per_s"], row["bound_tokens_per_s"], row["fraction_of_bound"]
        rows.append([row["phase"], str(row["tokens"]), f"{row['seconds']:.4f}", f"{tps:.2f}",
                     f"{bound:.2f}" if bound else "-", f"{frac:.0%}" if frac else "-", row["bounding_lane"] or "-"])
    return format_table(["phase", "tokens", "time s", "tokens/s", "bound tokens/s", "of bound", "bound by"], rows,
                        [False, True, True, True, True, True, False])


def describe_plan(plan: Any, case: Case, comparison: Any) -> str:
    """The ``offloadkit plan`` text: the plan in words, its memory, and its simulated speed."""
    spec, profile, w = case.spec, case.profile, case.workload
    name = spec.name or spec.arch
    rule = RULE_WORDS[plan.assign].format(n=plan.stream_min_tokens)
    chunks = plan.prefill_chunks(w.prompt_tokens)
    how = [f"rule: {plan.assign}: {rule}",
           f"staging buffers {plan.staging_buffers}; host weights {'pinned' if plan.pinned else 'pageable (mmap)'}; "
           f"prompt in {len(chunks)} chunk{'s' if len(chunks) > 1 else ''} of <= {chunks[0]} tokens; lanes "
           + ("run one after another (serial)" if plan.serial else "overlap")]
    if "seeded_from" in plan.meta:
        how.append(f"searched from the placement of {plan.meta['seeded_from']} (its GG set, run with this rule)")
    if "note" in plan.meta:
        how.append(str(plan.meta["note"]))
    parts = [f"plan {plan.name} ({plan.policy}) of {name} for {profile.name} · {w.label}, batch {w.batch} · routing "
             f"{case.routing_label} — every figure simulated on {profile.name} (cost model, not a measurement)",
             *how, "", "GG (resident on the GPU) by block kind:", kind_table(plan, spec), "",
             "GG by layer:", layer_table(plan, spec)]
    if spec.is_moe:
        parts += ["", hot_experts(plan, spec)]
    parts += ["", *memory_lines(plan, spec, profile, w), "",
              f"predicted, simulated on {profile.name} (bound: what no placement beats on this profile):",
              prediction_table(comparison)]
    return "\n".join(parts)


# ---- the command --------------------------------------------------------------------------------------

def cmd_plan(args: argparse.Namespace) -> int:
    from offloadkit.plan.host_memory import check_host_fits
    from offloadkit.plan.plan_io import save_plan
    from offloadkit.plan.policies import make_plan
    from offloadkit.runtime.sim import simulate

    out = check_output_file(args.out, "--out") if args.out is not None else None  # before the work
    case = read_case(args)
    plan = make_plan(args.policy, case.spec, case.profile, case.workload, case.routing)
    check_host_fits(plan, case.spec, case.profile, case.workload)
    result = simulate(case.spec, case.profile, plan, case.workload, case.routing, record=False)
    print(describe_plan(plan, case, plan_comparison(case, plan, result)))
    if out is not None:
        save_plan(plan, case.spec, out)
        print(f"wrote the plan to {args.out} (run it with: offloadkit simulate --model {args.model} --profile "
              f"{args.profile} --prompt {args.prompt} --gen {args.gen} --batch {args.batch} --routing {args.routing} "
              f"--plan {args.out})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``offloadkit`` parser."""
    p = sub.add_parser("plan", help="a policy's plan for a model on a hardware profile, in words (simulated)",
                       description="Make a policy's plan of a model on a hardware profile and describe it: GG "
                                   "rows per block kind and per layer, resident experts, GPU and host memory, and "
                                   "the tokens/s it is predicted to reach beside the bound. Every figure is "
                                   "simulated, not measured.")
    add_case_arguments(p)
    p.add_argument("--policy", default="scheinfer", choices=POLICY_NAMES, help="who makes the plan")
    p.add_argument("--out", help="also write the plan as JSON to this file, for 'offloadkit simulate --plan FILE' "
                                 "(default: not written)")
    p.set_defaults(func=cmd_plan)


__all__ = ["POLICY_NAMES", "Case", "add_case_arguments", "check_workload_args", "describe_plan", "plan_comparison",
           "read_case", "register"]
