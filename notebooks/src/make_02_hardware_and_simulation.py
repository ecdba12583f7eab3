"""Writes the notebook of the same name (without outputs). Run from the repository root: python FILE."""
import nbformat as nbf
nb = nbf.v4.new_notebook()
M = nbf.v4.new_markdown_cell
C = nbf.v4.new_code_cell
nb.cells = [
M("""# 02 · Hardware profiles and simulation

Chapter 01 showed that Mixtral-8x7B is 87 GiB of weights and that a token reads 24 GiB of them. Whether that runs at 2 or 20 tokens/s depends on three pipes: the CPU's DRAM, the GPU's memory, and the PCIe link between them. This chapter

1. **measures** this machine (the probe), and reads the **catalog** of moderate GPU systems (spec sheets × effective fractions, every figure with its source);
2. turns a profile into a **cost model**: the time of a task on a lane (`cpu`, `gpu`, `h2d`, `d2h`) from a roofline;
3. builds the **task graph** of an inference step and **simulates** it in virtual time: a Mixtral-8x7B on an RTX 4090 desktop, lane by lane;
4. shows what changes between **prefill** and **decode**.

Every number below is labelled: **measured** (on this machine), **spec sheet** (catalog), or **simulated** (the cost model on a named profile). The cost model and the simulator are offloadkit's own formulation, not the paper's."""),
C("""import torch
from offloadkit.hardware.catalog import load_catalog, load_profile
from offloadkit.hardware.probe import run_profile
from offloadkit.model.zoo import load_spec
from offloadkit.plan.plans import Workload, max_ngl, gpu_bytes_breakdown, check_fits, all_gpu
from offloadkit.runtime.sim import simulate
from offloadkit.viz import hardware as hw
from offloadkit.viz.timeline import timeline_figure

torch.set_num_threads(2)
mixtral = load_spec("mixtral-8x7b")"""),
M("""## 1. This machine, measured

`offloadkit profile` measures DRAM read bandwidth with a STREAM-like kernel on all cores, the CPU expert kernel's throughput across token counts, and the per-call overhead (and, on a machine with CUDA, the GPU and PCIe). Here we run it in `quick` mode (smaller buffers, a few seconds) and write the profile to a temporary file."""),
C("""import pathlib
import tempfile

here, path = run_profile(pathlib.Path(tempfile.mkdtemp()) / "this-machine.toml", quick=True, progress=False)
print(f"measured on this machine: {here.cpu.name}, {here.cpu.cores} cores")
print(f"  DRAM read       {here.cpu.dram_bandwidth_gbps:6.1f} GB/s")
print(f"  CPU f32 / bf16  {here.cpu.flops_f32_tflops * 1e3:6.1f} / {here.cpu.flops_bf16_tflops * 1e3:.1f} GFLOP/s")
print(f"  GPU             {here.gpu.name if here.gpu else 'none (CPU-only machine)'}")"""),
C("""hw.roofline_figure(here, mixtral)"""),
M("""The roofline bends where the expert stops being bound by DRAM and starts being bound by the CPU's arithmetic: a handful of tokens per weight. Decode sits far left (1 token), prefill far right (hundreds)."""),
M("""## 2. The catalog: moderate GPU systems

Each profile is a TOML file under `data/hardware/` with a source for every figure and an explicit effective fraction where a spec peak is discounted (`offloadkit hardware show NAME` prints them)."""),
C("""catalog = load_catalog()
for p in catalog:
    print(f"{p.name:<22} {p.cpu.dram_bandwidth_gbps:6.1f} GB/s DRAM | {p.gpu.name:<24} {p.gpu.usable_memory_gib:5.1f} GiB, "
          f"{p.gpu.memory_bandwidth_gbps:6.0f} GB/s | {p.link.name:<13} {p.link.h2d_pinned_gbps:5.1f} GB/s")
hw.catalog_figure(catalog + [here])"""),
M("""Three orders of magnitude separate the pipes: GPU memory (~1 TB/s), DRAM (~50–150 GB/s), PCIe (~12–25 GB/s). The next figure prices **one Mixtral expert** (176 M parameters, bf16) on an RTX 4090 desktop three ways: on the CPU, on the GPU if it were resident, and streamed over PCIe first. At decode the CPU beats streaming; at prefill streaming wins, because its cost does not grow with tokens. That crossing is what ScheInfer's token assignment exploits."""),
C("""rtx4090 = load_profile("rtx4090-desktop")
hw.block_time_figure(rtx4090, mixtral)"""),
M("""## 3. Plans and memory

A **plan** says which weights live on the GPU. For now three simple ones: `all-cpu`, `all-gpu`, and llama.cpp's `-ngl N` (N whole layers on the GPU). A plan must fit: resident weights + KV cache + activations + staging buffers ≤ usable GPU memory."""),
C("""w = Workload(prompt_tokens=512, gen_tokens=128)
try:
    check_fits(all_gpu(mixtral), mixtral, rtx4090, w)
except Exception as e:
    print(type(e).__name__, ":", e)
n = max_ngl(mixtral, rtx4090, w)
print(f"largest ngl that fits on {rtx4090.name}: {n} of {mixtral.n_layers} layers")"""),
M("""## 4. A simulated Mixtral-8x7B on an RTX 4090 desktop

`simulate` builds the task graph of every step (prefill 512 tokens, then 128 decode steps), prices each task with the cost model, and runs it in virtual time: a task starts when its lane is free and its inputs are ready. Shapes only: no weights are needed. Routing is Zipf-skewed (some experts hot)."""),
C("""r = simulate(mixtral, rtx4090, f"ngl:{n}", w, "zipf:1.2")
print(r.table())"""),
M("""The prefill step: with many tokens, llama.cpp's op offload copies the weights of CPU layers to the GPU and multiplies there, so the `h2d` lane is busy the whole time."""),
C("""timeline_figure(r.timeline, step=0)"""),
M("""One decode step: one token. Copying 100 MB of weights to multiply them by one vector would be absurd, so the CPU layers compute on the CPU — and the GPU idles while it waits. This idle GPU, and the idle PCIe link at decode, are what ScheInfer's CC/CG/GG split puts to work (chapters 05–07)."""),
C("""timeline_figure(r.timeline, step=1)"""),
M("""## 5. Prefill vs decode, across plans and machines

All **simulated**: the same model and workload under three plans on each catalog machine (plans that do not fit are skipped)."""),
C("""from offloadkit.errors import PlanError
rows = []
for p in catalog:
    for plan in ("all-cpu", f"ngl:{max_ngl(mixtral, p, w)}"):
        try:
            res = simulate(mixtral, p, plan, w, "zipf:1.2", record=False)
        except PlanError:  # the plan does not fit this GPU
            continue
        rows.append((p.name, plan, res.prefill_tokens_per_s, res.decode_tokens_per_s,
                     res.bounding_lane("prefill"), res.bounding_lane("decode")))
print(f"{'profile':<22} {'plan':<8} {'prefill tok/s':>13} {'decode tok/s':>12}  bound (prefill/decode)   [simulated]")
for name, plan, pp, tg, bp, bd in rows:
    print(f"{name:<22} {plan:<8} {pp:>13.1f} {tg:>12.2f}  {bp}/{bd}")"""),
M("""## 6. The simulator computes the right thing

A simulator that only adds up times could be wrong about *what* runs where. With `weights=`, the simulator also executes every task on real tensors (on the CPU, in the task order it scheduled), so we can check that a plan computes exactly the reference model's logits. Here a tiny random Mixtral under `ngl:1`:"""),
C("""from offloadkit.model.writer import make_config, random_weights
from offloadkit.model.spec import ModelSpec
from offloadkit.model.reference import ReferenceModel

tiny = ModelSpec.from_config(make_config("mixtral", layers=2, hidden=64, experts=4, vocab=300, dtype="float32"), "tiny")
weights = random_weights(tiny, seed=0)
ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(0))
sim = simulate(tiny, rtx4090, "ngl:1", Workload(6, 3), weights=weights, prompt_ids=ids)
got = torch.cat(sim.tokens, dim=1)[0].tolist()  # the prefill's token, then one per decode step
ref = ReferenceModel(tiny, weights).greedy(ids, len(got))[0].tolist()
print("simulated-with-numerics tokens:", got, " reference:", ref)
assert got == ref"""),
M("""## What's next

Chapter 03 writes the GPU lane's CUDA kernels; chapter 04 the CPU lane's Numba experts, measured against this machine's DRAM bandwidth."""),
]
for i, cell in enumerate(nb.cells):
    cell.id = str(i)  # the ids nbstripout writes: regenerating gives a clean diff
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "notebooks/02_hardware_and_simulation.ipynb")
