"""The hybrid engine end to end on one device: each policy's plan run for real, against the reference and the simulator.

What it does, in one process (``benchmarks/gpu_check.py`` runs it as its "hybrid engine" stage):

1. writes a random-weight Mixtral-shaped checkpoint (no download; :func:`offloadkit.model.writer.write_checkpoint`):
   on ``cuda`` a few layers of a larger shape (hidden 2048, 8 experts top-2, intermediate 7168, 4 layers,
   bf16: about 3 GiB), on ``loopback`` a tiny one (hidden 64, 4 experts, 2 layers);
2. makes the device a **moderate GPU**: its memory is capped (``CudaDevice(memory_fraction=...)``, or the
   loopback device's ``memory_bytes``) so that the model does not fit whole and a plan can keep only
   about half of its weights resident (``RESIDENT_SHARE``), the rest on the host;
3. takes a hardware profile: on ``cuda`` ``offloadkit profile --quick`` measures this machine (written into
   ``--out``), on ``loopback`` the catalog's ``rtx4090-desktop``; either way its usable GPU memory is set to
   what the cap leaves (``dataclasses.replace``), so the plans are made for the capped device;
4. for each policy (scheinfer, llamacpp, fiddler): makes its plan for that profile, opens the hybrid engine
   (:func:`offloadkit.runtime.engine.open_hybrid`) on a fresh device, generates once to warm up (kernel
   compilation, first-touch of pinned memory), then :func:`~offloadkit.runtime.engine.measure_generation`:
   greedy tokens, which must equal the reference forward's (:meth:`ReferenceModel.greedy`), and pp / tg
   tokens/s **measured**; and the simulator's pp / tg tokens/s for the same plan, profile and workload
   (**simulated**), and their ratio.

It prints one table and writes ``hybrid_check.json`` (and each policy's measured timeline as a Chrome
trace) into ``--out``. Measured figures name the device (a GPU's name, or the loopback device, whose
lanes are CPU threads: never GPU figures); simulated ones name the profile. Exit status 1 if a policy
failed or its tokens differ from the reference's.

Run: ``python benchmarks/hybrid_check.py --device cuda|loopback --out DIR`` (``--shape cuda`` with
``--device loopback`` rehearses the GPU run's model on CPU threads: a few minutes; ``--profile`` skips the probe).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
POLICIES = ("scheinfer", "llamacpp", "fiddler")
#: the share of the model's weights the capped GPU can hold beside everything else a plan puts there
RESIDENT_SHARE = 0.5

#: the model of each device kind: make_config arguments, prompt and generated tokens
SHAPES: dict[str, dict[str, Any]] = {
    "cuda": {"config": dict(layers=4, hidden=2048, heads=16, kv_heads=4, experts=8, top_k=2, intermediate=7168,
                            vocab=32000, dtype="bfloat16"),
             "prompt": 128, "gen": 32},
    # vocab 320: the byte-level tokenizer the writer adds needs at least 259 ids
    "loopback": {"config": dict(layers=2, hidden=64, heads=4, kv_heads=2, experts=4, top_k=2, intermediate=128,
                                vocab=320, dtype="bfloat16"),
                 "prompt": 40, "gen": 8},  # 40 >= 32: llama.cpp copies its weights for the prompt
}


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- the model, the profile, the cap ---------------------------------------------------------------------


def write_model(folder: Path, kind: str) -> Any:
    from offloadkit.model.spec import ModelSpec
    from offloadkit.model.writer import make_config, write_checkpoint

    config = make_config("mixtral", **SHAPES[kind]["config"])
    t0 = time.perf_counter()
    write_checkpoint(folder, config, seed=0)
    spec = ModelSpec.from_file(folder)
    log(f"wrote a random Mixtral-shaped checkpoint to {folder} in {time.perf_counter() - t0:.1f} s: "
        f"{describe_spec(spec)}")
    return spec


def describe_spec(spec: Any) -> str:
    size = (f"{spec.total_bytes / GIB:.2f} GiB" if spec.total_bytes >= GIB / 4
            else f"{spec.total_bytes / 2**20:.2f} MiB")
    return (f"{spec.n_layers} layers, hidden {spec.hidden_size}, {spec.n_experts} experts top-{spec.top_k} "
            f"(intermediate {spec.expert_intermediate_size}), vocab {spec.vocab_size}, {spec.dtype}, "
            f"{size} of weights")


def measured_profile(out: Path) -> Any:
    """``offloadkit profile --quick`` on this machine (its own process), written into ``out``."""
    from offloadkit.hardware.catalog import load_profile

    path = out / "profile.toml"
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", "import sys; from offloadkit.cli import main; sys.exit(main())",
                          "profile", "--quick", "--no-progress", "--out", str(path)],
                         cwd=REPO, capture_output=True, text=True)
    log(f"offloadkit profile --quick: exit {run.returncode} in {time.perf_counter() - t0:.0f} s\n"
        + "\n".join("  " + line for line in (run.stdout + run.stderr).strip().splitlines()))
    if run.returncode:
        raise SystemExit("offloadkit profile failed; see above")
    return load_profile(path)


def plan_memory_bytes(spec: Any, workload: Any) -> int:
    """The GPU memory a plan may use: ``RESIDENT_SHARE`` of the weights, plus the KV cache and activations an
    all-GPU plan would hold beside them (staging buffers for streamed rows come out of the weights' share)."""
    from offloadkit.plan.plans import all_gpu, gpu_bytes_breakdown

    parts = gpu_bytes_breakdown(all_gpu(spec), spec, workload)
    return int(RESIDENT_SHARE * spec.total_bytes) + parts["kv_cache"] + parts["activations"]


def capped_profile(profile: Any, usable_bytes: int, cap_bytes: int, what: str) -> Any:
    """``profile`` with the capped device's memory: ``usable_bytes`` for plans, ``cap_bytes`` in all."""
    gpu = dataclasses.replace(profile.gpu, usable_memory_gib=usable_bytes / GIB, memory_gib=cap_bytes / GIB)
    return dataclasses.replace(profile, gpu=gpu, description=f"{profile.description}; {what}")


# ---- one policy ------------------------------------------------------------------------------------------


def open_device(kind: str, cap_bytes: int) -> Any:
    if kind == "cuda":
        import torch

        from offloadkit.runtime.cuda_device import CudaDevice

        total = torch.cuda.mem_get_info(0)[1]
        return CudaDevice(0, memory_fraction=min(cap_bytes / total, 1.0))
    from offloadkit.runtime.devices import LoopbackDevice

    return LoopbackDevice(memory_bytes=cap_bytes)


def run_policy(policy: str, model: Path, spec: Any, profile: Any, kind: str, cap_bytes: int, workload: Any,
               prompt: Any, reference: list[int], out: Path) -> dict[str, Any]:
    from offloadkit.plan.plans import gpu_bytes_breakdown
    from offloadkit.plan.policies import make_plan
    from offloadkit.runtime.engine import measure_generation, open_hybrid
    from offloadkit.runtime.sim import simulate

    row: dict[str, Any] = {"policy": policy}
    t0 = time.perf_counter()
    plan = make_plan(policy, spec, profile, workload)
    parts = gpu_bytes_breakdown(plan, spec, workload)
    row.update(plan=plan.name, resident_share=parts["weights"] / spec.total_bytes,
               gpu_bytes={k: int(v) for k, v in parts.items()})
    sim = simulate(spec, profile, plan, workload, weights=None)
    row["simulated"] = {"source": "simulated", "profile": profile.name, "pp_tps": sim.prefill_tokens_per_s,
                        "tg_tps": sim.decode_tokens_per_s, "prefill_s": sim.prefill_s, "decode_s": sim.decode_s}
    device = open_device(kind, cap_bytes)
    label = device.label
    engine = open_hybrid(model, device=device, plan=plan, profile=profile, workload=workload)
    try:
        t1 = time.perf_counter()
        measure_generation(engine, prompt, 2)  # warm-up: kernels compiled, buffers touched
        warm = time.perf_counter() - t1
        run = measure_generation(engine, prompt, workload.gen_tokens + 1)  # prefill + gen_tokens decode steps
        run.timeline.write_chrome_trace(out / f"timeline-{policy}.json")
    finally:
        engine.close()
    row["tokens"] = run.tokens
    row["tokens_equal"] = run.tokens == reference
    row["first_mismatch"] = next((i for i, (a, b) in enumerate(zip(run.tokens, reference, strict=False)) if a != b),
                                 None if len(run.tokens) == len(reference) else min(len(run.tokens), len(reference)))
    row["measured"] = {"source": "measured", "device": label, "device_kind": kind, "pp_tps": run.pp_tps,
                       "tg_tps": run.tg_tps, "prefill_s": run.prefill_s, "decode_s": run.decode_s,
                       "warmup_s": warm, "tasks": len(run.timeline.records)}
    row["ratio"] = {k: (row["measured"][f"{k}_tps"] / row["simulated"][f"{k}_tps"]
                        if row["simulated"][f"{k}_tps"] else None) for k in ("pp", "tg")}
    row["seconds"] = time.perf_counter() - t0
    return row


def release(kind: str) -> None:
    """Drop the last engine's device memory before the next device is opened under the same cap."""
    gc.collect()
    if kind == "cuda":
        import torch

        torch.cuda.empty_cache()


# ---- the report --------------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def table(rows: list[dict[str, Any]], device_label: str, profile_name: str) -> str:
    headers = ["policy", "tokens equal", "resident", "pp t/s measured", "tg t/s measured",
               "pp t/s simulated", "tg t/s simulated", "pp measured/simulated", "tg measured/simulated"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["policy"], "ERROR (below)", *["-"] * 7])
            continue
        m, s = r["measured"], r["simulated"]
        body.append([r["policy"], "yes" if r["tokens_equal"] else f"NO (from token {r['first_mismatch']})",
                     f"{100 * r['resident_share']:.0f}%", _f(m["pp_tps"]), _f(m["tg_tps"]), _f(s["pp_tps"]),
                     _f(s["tg_tps"]), _f(r["ratio"]["pp"], ".2f"), _f(r["ratio"]["tg"], ".2f")])
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *body, strict=False)]
    lines = ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                  strict=True)))
             for cells in [headers, ["-" * w for w in widths], *body]]
    from offloadkit.hardware.machine import machine_label

    legend = [f"measured: the hybrid engine on {device_label}, host {machine_label()}; one run after a warm-up",
              f"simulated: offloadkit's simulator on profile {profile_name}",
              "resident: the share of the weights the plan keeps in (capped) GPU memory"]
    errors = [f"{r['policy']} failed: {r['error']}" for r in rows if "error" in r]
    return "\n".join([*lines, "", *legend, *errors])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "loopback"], default="cuda", help="where the GPU lanes run")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for hybrid_check.json, the profile, "
                        "the timelines (default: $OUT, else a temporary folder)")
    parser.add_argument("--profile", help="a profile (catalog name or TOML) instead of measuring one / the catalog's")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policies to run")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="the model's shape (default: the device's; "
                        "--device loopback --shape cuda rehearses the GPU run's model on CPU threads)")
    parser.add_argument("--prompt", type=int, help="prompt tokens (default: 128 on cuda, 40 on loopback)")
    parser.add_argument("--gen", type=int, help="decode steps measured (default: 32 on cuda, 8 on loopback)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="hybrid_check-"))
    out.mkdir(parents=True, exist_ok=True)
    kind = args.device

    import torch

    from offloadkit.hardware.catalog import load_profile
    from offloadkit.hardware.machine import machine_label
    from offloadkit.model.checkpoint import open_checkpoint
    from offloadkit.model.reference import ReferenceModel
    from offloadkit.plan.plans import Workload, all_gpu, gpu_bytes

    if kind == "cuda" and not torch.cuda.is_available():
        from offloadkit.runtime.cuda_device import cuda_unavailable_reason

        log(f"--device cuda: no CUDA here ({cuda_unavailable_reason()}); use --device loopback")
        return 2
    shape = SHAPES[args.shape or kind]
    p, n = args.prompt or shape["prompt"], args.gen or shape["gen"]
    workload = Workload(prompt_tokens=p, gen_tokens=n)
    with tempfile.TemporaryDirectory(prefix="hybrid_check-model-") as tmp:
        model = Path(tmp) / "mixtral-random"
        spec = write_model(model, args.shape or kind)

        usable = plan_memory_bytes(spec, workload)
        # the device's cap: on a GPU the plans' share plus room for what plans do not count (allocator
        # rounding, cuBLAS workspaces, the executor's per-step temporaries); the loopback device counts
        # nothing but the plan's bytes
        cap = usable + max(usable // 4, 512 * 2**20) if kind == "cuda" else usable
        whole = gpu_bytes(all_gpu(spec), spec, workload)
        if whole <= cap:
            log(f"the whole model ({whole / 2**20:.1f} MiB with its KV cache and activations) fits the "
                f"{cap / 2**20:.1f} MiB cap: not a moderate GPU")
            return 2
        if args.profile:
            base, source = load_profile(args.profile), f"given: {args.profile}"
        elif kind == "cuda":
            base, source = measured_profile(out), "measured by offloadkit profile --quick on this machine"
        else:
            base, source = load_profile("rtx4090-desktop"), "the catalog's rtx4090-desktop"
        if base.gpu is None:
            log(f"profile {base.name} has no GPU: the policies need one")
            return 2
        what = (f"GPU memory set to the capped device's: {usable / 2**20:.1f} MiB usable "
                f"({RESIDENT_SHARE:.0%} of the model's weights + KV cache + activations) of {cap / 2**20:.1f} MiB")
        profile = capped_profile(base, usable, cap, what)
        log(f"profile {profile.name} ({source}); {what}: the whole model on the GPU would need "
            f"{whole / 2**20:.1f} MiB, it does not fit")

        t0 = time.perf_counter()
        ckpt = open_checkpoint(model)
        prompt = torch.randint(3, spec.vocab_size, (1, p), generator=torch.Generator().manual_seed(1))
        reference = ReferenceModel(spec, ckpt).greedy(prompt, n + 1)[0].tolist()
        log(f"reference greedy ({p} prompt tokens, {n + 1} new) in {time.perf_counter() - t0:.1f} s: {reference}")

        rows: list[dict[str, Any]] = []
        device_label = "?"
        for policy in [x.strip() for x in args.policies.split(",") if x.strip()]:
            log(f"-- {policy}")
            try:
                row = run_policy(policy, model, spec, profile, kind, cap, workload, prompt, reference, out)
                device_label = row["measured"]["device"]
                log(f"   plan {row['plan']}: {100 * row['resident_share']:.0f}% of the weights resident; tokens "
                    f"{'equal the reference' if row['tokens_equal'] else 'DIFFER: ' + str(row['tokens'])}; "
                    f"{row['seconds']:.1f} s")
            except Exception as e:  # one policy failing leaves the others to report
                traceback.print_exc()
                row = {"policy": policy, "error": f"{type(e).__name__}: {e}"}
            rows.append(row)
            release(kind)

    report = {
        "device": {"kind": kind, "label": device_label, "is_gpu": kind == "cuda"},
        "machine": machine_label(), "model": {"arch": "mixtral", **shape["config"], "bytes": spec.total_bytes},
        "profile": {"name": profile.name, "source": source, "usable_gpu_bytes": usable},
        "device_cap_bytes": cap, "all_gpu_bytes": whole, "workload": {"prompt_tokens": p, "gen_tokens": n},
        "reference_tokens": reference, "policies": rows, "seconds": time.perf_counter() - started,
    }
    (out / "hybrid_check.json").write_text(json.dumps(report, indent=2) + "\n")
    title = (f"hybrid engine, {describe_spec(spec)}; pp{p} + tg{n}; "
             f"{'GPU' if kind == 'cuda' else 'loopback device (CPU threads, not GPU figures)'}")
    log("\n" + title + "\n" + table(rows, device_label, profile.name))
    log(f"wrote {out / 'hybrid_check.json'} ({time.perf_counter() - started:.0f} s in all)")
    bad = [r["policy"] for r in rows if "error" in r or not r["tokens_equal"]]
    if bad:
        log("failed: " + ", ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
