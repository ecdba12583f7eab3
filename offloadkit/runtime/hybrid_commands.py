"""``offloadkit generate --device loopback|cuda``: text or a pp/tg benchmark from the hybrid engine.

``offloadkit generate`` (in :mod:`offloadkit.cli`) runs the reference or the CPU engine; with
``--device loopback`` or ``--device cuda`` it runs the hybrid engine (:mod:`offloadkit.runtime.engine`)
under a policy's plan (``--policy``, default ``scheinfer``) or a given plan (``--plan``), sized for a
hardware profile (``--profile``: a catalog name, or a TOML written by ``offloadkit profile``).
``--gpu-memory-gib`` caps the GPU (CUDA: the process's memory fraction; loopback: its memory) and plans
for that much (a *moderate GPU* on a big card). ``--bench`` times a random prompt of ``-p`` tokens and
``-n`` generated tokens instead of printing text, and prints pp and tg tokens/s **measured** on the
machine and device, beside the simulator's figures for the same plan on the profile (**simulated**).
``--trace FILE`` writes the measured timeline as a Chrome trace (Perfetto).

Refused with a message, before any work: ``--plan`` with ``--policy``; ``--engine reference`` with a
device; a hybrid device without ``--profile``; ``--bench`` with ``--prompt``; sizes below 1.
"""

from __future__ import annotations

import argparse
from typing import Any

from offloadkit.errors import OffloadkitError

DEVICES = ("cpu", "loopback", "cuda")


def add_hybrid_arguments(p: argparse.ArgumentParser) -> None:
    """The hybrid engine's options of ``offloadkit generate``."""
    g = p.add_argument_group("hybrid engine (--device loopback|cuda)")
    g.add_argument("--device", choices=DEVICES,
                   help="cpu: the CPU engine (as --engine cpu); loopback: the hybrid engine with CPU threads "
                        "standing in for a GPU (its timings are not GPU figures); cuda: the hybrid engine on the GPU "
                        "(default: the --engine)")
    g.add_argument("--policy", help="whose plan to run: scheinfer, llamacpp, fiddler, ktransformers, cpu-only, "
                                    "gpu-only (default: scheinfer, unless --plan)")
    g.add_argument("--plan", help="run this plan instead of a policy's: all-cpu, all-gpu, ngl:N or PATH.json")
    g.add_argument("--profile", help="the machine to plan for: a catalog name (offloadkit hardware list) or a TOML "
                                     "written by offloadkit profile (required with loopback and cuda)")
    g.add_argument("--gpu-memory-gib", type=float,
                   help="cap the GPU at this many GiB and plan for it (a moderate GPU; default: the profile's)")
    g.add_argument("--bench", action="store_true",
                   help="time a random prompt of -p tokens and -n new tokens (measured), beside the simulator's "
                        "figures for the same plan (simulated), instead of printing text")
    g.add_argument("-p", "--prompt-tokens", type=int, default=64, help="--bench: prompt tokens")
    g.add_argument("-n", "--gen-tokens", type=int, default=32, help="--bench: generated tokens")
    g.add_argument("--trace", help="write the measured timeline to this Chrome trace file (opens in Perfetto)")
    g.add_argument("--wait-s", type=float, default=120.0,
                   help="the bound of every wait on a task or a copy, in seconds (a stall past it is an error)")


def wants_hybrid(args: argparse.Namespace) -> bool:
    """Whether ``generate`` runs the hybrid engine; refuses option mixes that say two things."""
    hybrid = args.device in ("loopback", "cuda")
    if args.engine == "hybrid" and not hybrid:
        raise OffloadkitError("--engine hybrid runs on a device: add --device loopback (CPU threads standing in "
                              "for a GPU) or --device cuda")
    if args.device is not None and args.engine is not None:
        wanted = "cpu" if args.device == "cpu" else "hybrid"
        if args.engine != wanted:
            raise OffloadkitError(f"--engine {args.engine} and --device {args.device} ask for different engines; "
                                  f"give one")
    if not hybrid:
        for flag in ("policy", "plan", "profile", "gpu_memory_gib", "trace"):
            if getattr(args, flag) is not None:
                raise OffloadkitError(f"--{flag.replace('_', '-')} applies to the hybrid engine: add --device "
                                      f"loopback or --device cuda")
        if args.bench:
            raise OffloadkitError("--bench times the hybrid engine: add --device loopback or --device cuda "
                                  "(offloadkit bench compares the CPU engine with llama.cpp)")
    return hybrid


def _check(args: argparse.Namespace) -> None:
    from offloadkit.output_paths import check_output_file

    if args.trace is not None:
        check_output_file(args.trace, "--trace")
    if args.plan is not None and args.policy is not None:
        raise OffloadkitError(f"--plan {args.plan} and --policy {args.policy} both say what to run; give one")
    if args.profile is None:
        raise OffloadkitError(f"--device {args.device} needs --profile: the plan and each step's CPU/GPU split are "
                              f"sized from a machine's figures (a catalog name such as rtx4090-desktop, or the "
                              f"TOML that offloadkit profile writes on this machine)")
    if args.bench and args.prompt is not None:
        raise OffloadkitError("--bench runs a random prompt of -p tokens; drop --prompt (or drop --bench for text)")
    if not args.bench and args.prompt is None:
        raise OffloadkitError("give --prompt TEXT (or --bench to time a random prompt)")
    for flag, v in (("--prompt-tokens", args.prompt_tokens), ("--gen-tokens", args.gen_tokens),
                    ("--max-new-tokens", args.max_new_tokens)):
        if v < 1:
            raise OffloadkitError(f"{flag} must be at least 1, got {v}")
    if args.gpu_memory_gib is not None and not args.gpu_memory_gib > 0:
        raise OffloadkitError(f"--gpu-memory-gib must be > 0, got {args.gpu_memory_gib:g}")
    if args.wait_s <= 0:
        raise OffloadkitError(f"--wait-s must be > 0, got {args.wait_s:g}")


def _open(args: argparse.Namespace, prompt_tokens: int, gen_tokens: int) -> Any:
    from offloadkit.hardware.catalog import load_profile
    from offloadkit.hardware.whatif import what_if
    from offloadkit.plan.plans import Workload
    from offloadkit.runtime.device_open import open_device
    from offloadkit.runtime.engine import open_hybrid

    profile = load_profile(args.profile)
    cap = args.gpu_memory_gib
    if cap is not None:
        if profile.gpu is None:
            raise OffloadkitError(f"--gpu-memory-gib caps a GPU, and profile {profile.name!r} has none")
        profile = what_if(profile, gpu_gib=cap)
    if args.device == "cuda":
        kw: dict[str, Any] = {}
        if cap is not None:
            import torch

            if torch.cuda.is_available():
                total = torch.cuda.get_device_properties(0).total_memory
                kw["memory_fraction"] = min(cap * 2**30 / total, 1.0)
        device = open_device("cuda", **kw)
    else:
        device = open_device("loopback", memory_bytes=int(cap * 2**30) if cap is not None else None)
    workload = Workload(prompt_tokens=prompt_tokens, gen_tokens=gen_tokens)
    return open_hybrid(args.model, device=device, plan=args.plan,
                       policy=None if args.plan else (args.policy or "scheinfer"), profile=profile,
                       workload=workload, wait_s=args.wait_s)


def run_hybrid(args: argparse.Namespace) -> int:
    """``offloadkit generate --device loopback|cuda``."""
    _check(args)
    if args.bench:
        return _bench(args)
    from offloadkit.model.generate import SamplingConfig, stream_text
    from offloadkit.model.tokenizer import load_tokenizer
    from offloadkit.model.zoo import resolve_model

    tok = load_tokenizer(resolve_model(args.model))
    n_prompt = max(len(tok.encode(args.prompt)), 1)
    engine = _open(args, n_prompt, args.max_new_tokens)
    with engine:
        print(f"[{engine.plan.name} plan on {engine.device.label}]")
        stream_text(engine, tok, args.prompt, args.max_new_tokens,
                    SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed))
        _trace(args, engine.timeline)
    return 0


def _trace(args: argparse.Namespace, timeline: Any) -> None:
    if args.trace:
        timeline.write_chrome_trace(args.trace)
        print(f"wrote the measured timeline ({len(timeline)} tasks) to {args.trace}")


def _bench(args: argparse.Namespace) -> int:
    import torch

    from offloadkit.plan.plans import Workload
    from offloadkit.runtime.engine import measure_generation
    from offloadkit.runtime.sim import simulate

    engine = _open(args, args.prompt_tokens, args.gen_tokens)
    with engine:
        spec = engine.spec
        ids = torch.randint(0, spec.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        measure_generation(engine, ids[:, :min(8, args.prompt_tokens)], 2)  # warm-up: compile, first touches
        run = measure_generation(engine, ids, args.gen_tokens)
        sim = simulate(spec, engine.profile, engine.plan, Workload(args.prompt_tokens, args.gen_tokens),
                       check_memory=False, record=False)
        _trace(args, run.timeline)
    tg = f"{run.tg_tps:10.1f}" if args.gen_tokens > 1 else f"{'—':>10}"
    print(f"| test | measured t/s | simulated t/s |\n|---|---|---|\n"
          f"| pp{args.prompt_tokens} | {run.pp_tps:10.1f} | {sim.prefill_tokens_per_s:10.1f} |\n"
          f"| tg{args.gen_tokens} | {tg} | {sim.decode_tokens_per_s:10.1f} |")
    print(f"measured: {engine.machine}" + ("" if engine.device.is_gpu else
                                           " — the loopback device's lanes are CPU threads: not GPU figures"))
    print(f"simulated: the cost model on profile {engine.profile.name}; plan {engine.plan.name} "
          f"({engine.plan.policy}); model {spec.name or spec.arch}")
    return 0


__all__ = ["DEVICES", "add_hybrid_arguments", "run_hybrid", "wants_hybrid"]
