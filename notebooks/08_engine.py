# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · The engine: the chapters' parts assembled
#
# Chapters 03 to 07 each built one part of a hybrid engine. This chapter puts them together and watches the whole thing run:
#
# 1. the parts, each named where it enters the engine (its module and its chapter), checked on an open engine;
# 2. a prefill and a decode step of the demo model, **measured** on the hybrid engine here beside the **simulated** run of the same plan on the same profile, and what must agree between the two;
# 3. what changes as the prompt grows from 16 to 4096 tokens, on Mixtral-8x7B and an RTX 4090 desktop (**simulated**), with a slider.
#
# On a machine without a GPU the engine runs on the `LoopbackDevice`: one CPU thread per device stream, the CUDA kernels replaced by their torch twins, copies slowed to the profile's PCIe rate. Its tokens and its ordering are real; its times are CPU times, and every figure made from them says so.

# %%
import torch
from IPython.display import display

from offloadkit.course import engine_tour as et
from offloadkit.hardware.catalog import load_profile
from offloadkit.hardware.whatif import what_if
from offloadkit.model.checkpoint import open_checkpoint
from offloadkit.model.reference import ReferenceModel
from offloadkit.model.tokenizer import load_tokenizer
from offloadkit.model.zoo import load_spec, resolve_model
from offloadkit.plan.plans import Workload
from offloadkit.plan.policies import make_plan
from offloadkit.runtime.engine import HybridEngine
from offloadkit.viz import streaming as vs
from offloadkit.viz.dashboards import TimelineExplorer

torch.set_num_threads(2)
HAS_GPU = torch.cuda.is_available()
print("this machine has a CUDA GPU:", torch.cuda.get_device_name(0) if HAS_GPU else "no")

# %% [markdown]
# ## 1. The parts, and where each enters
#
# The demo model (7.4 MiB, chapter 01) is planned for the RTX 4090 desktop of the catalog with its GPU memory cut to 4 MiB by a what-if, so that about half of it is resident and the rest must be computed on the CPU or streamed: a real hybrid case at a size this laptop runs in milliseconds. The plan is ScheInfer's (`make_plan("scheinfer", ...)`).
#
# | part | module | chapter | where it enters the engine |
# |---|---|---|---|
# | GPU kernels | `offloadkit.kernels.cuda.ops` (twins: `offloadkit.kernels.cuda.twins`) | [03](03_cuda_kernels.ipynb) | `device.ops`, called by the gpu lane for GG and CG slices |
# | CPU experts | `offloadkit.kernels.cpu.experts` | [04](04_cpu_experts.ipynb) | `expert_rows`, called by the cpu lane for CC rows |
# | PCIe streaming | `offloadkit.runtime.streaming` | [05](05_pcie_streaming.ipynb) | `executor.streamer`: resident rows uploaded once, CG rows staged |
# | adaptive partition | `offloadkit.plan.partition` | [06](06_partitioning.ipynb) | `plan.gg_rows`: which rows of each block live on the GPU |
# | token assignment | `offloadkit.plan.assign` | [07](07_token_assignment.ipynb) | `executor.assigner`: each step's CC / CG split |
# | step graph + executor | `offloadkit.runtime.executor` | 08 (here) | four lane threads running the simulator's own step graph |
#
# Opened, the engine shows each of them:

# %%
folder = resolve_model("demo")
ckpt = open_checkpoint(folder)
spec, tok = ckpt.spec, load_tokenizer(folder)
profile = what_if(load_profile("rtx4090-desktop"), gpu_gib=0.004)
prompt_ids = torch.tensor([tok.encode("A class definition")])
n_new = 8
workload = Workload(prompt_ids.shape[1], n_new)
plan = make_plan("scheinfer", spec, profile, workload)

with HybridEngine(spec, ckpt, plan, profile, et.open_device(profile), workload=workload) as engine:
    for part, found in et.engine_parts(engine):
        print(f"{part.part:<22} {part.chapter:<20} {part.module:<32} -> {found}")
        part.load()  # every part's module imports
    expected_ops = "offloadkit.kernels.cuda.ops" if engine.device.is_gpu else "offloadkit.kernels.cuda.twins"
    assert engine.device.ops.__name__ == expected_ops
    assert sum(plan.gg_rows.values()) > 0 and plan.assign == "balance"

# %% [markdown]
# The plan was made for this profile's memory (4 MiB usable), so the partition kept about half of the rows resident and the token assignment rule is `balance`: at every step, the host rows of each block split so that the CPU computing its CC share and the link carrying the CG share finish together (chapter 07).
#
# ## 2. A prefill and a decode step, measured and simulated
#
# `run_hybrid` runs a warm-up and then a timed greedy generation on the engine (**measured**), the reference model on the same prompt, and the simulator on the same plan, profile and weights (**simulated**, with numerics: every task computed on real tensors, so its routing is the model's own).

# %%
reference = ReferenceModel(spec, ckpt)
run = et.run_hybrid(spec, ckpt, profile, prompt_ids, n_new, plan=plan, reference=reference)
print(f"'A class definition' ->{tok.decode(run.tokens)!r}")
assert run.tokens == run.reference_tokens == run.simulated_tokens
for step in range(n_new):
    measured_tasks = sorted((r.name, r.bytes_) for r in run.measured.timeline.select(step=step).records)
    simulated_tasks = sorted((r.name, r.bytes_) for r in run.simulated.timeline.select(step=step).records)
    assert measured_tasks == simulated_tasks, f"step {step}: another graph in the engine than in the simulator"
print(f"engine, reference and simulator: the same {n_new} tokens; at every step the engine ran the simulator's "
      f"tasks with the same bytes")

# %% [markdown]
# What must agree, does: the same tokens, and at every step the same tasks moving the same bytes, because the engine and the simulator build each step from one `StepBuilder` and the same routing. What need not agree is how long each task takes. The prefill:

# %%
m0, s0 = run.step(0)
vs.measured_vs_simulated_figure(m0, s0, f"demo-mixtral prefill ({prompt_ids.shape[1]} tokens), {plan.name} plan")

# %% [markdown]
# And one decode step (one token):

# %%
m1, s1 = run.step(1)
vs.measured_vs_simulated_figure(m1, s1, f"demo-mixtral decode step 1, {plan.name} plan")

# %% [markdown]
# Read the shapes, not the scales:
#
# - Both runs have the layers one after another, and inside each the same pattern: attention on the GPU (resident), the router, then the experts: the resident (GG) rows on the `gpu` lane, the CC rows on `cpu` at the same time, the CG rows crossing `h2d` and computed on `gpu` when they arrive, and the partial sums coming back over `d2h`.
# - The simulated step takes well under a millisecond on the profile's RTX 4090. The measured one takes tens of milliseconds: the loopback "GPU" is a CPU thread running torch, every task is dispatched by Python, and two cores are shared by four lane threads. Numbers from this device are never GPU figures; `offloadkit generate --device cuda` on a machine with a GPU measures the real ones.
# - At decode there is one token per step, so few experts are used and both lanes' shares shrink; the fixed costs (launches, the router's round trip) take a larger part of the step.
#
# The measured totals, for the record:

# %%
print(f"measured on {run.measured.timeline.machine}:")
print(f"  prefill {run.measured.prefill_s * 1e3:.1f} ms, {n_new - 1} decode steps {run.measured.decode_s * 1e3:.1f} ms")
print(f"simulated on {run.simulated.profile}:")
print(f"  prefill {run.simulated.prefill_s * 1e3:.3f} ms, {n_new - 1} decode steps {run.simulated.decode_s * 1e3:.3f} ms")

# %% [markdown]
# ## 3. As the prompt grows
#
# Mixtral-8x7B on `rtx4090-desktop`, one ScheInfer plan (made for the longest prompt plus 128 generated tokens, as an engine keeps one placement), prefills of 16 to 4096 tokens, **simulated**. `PromptExplorer` (`offloadkit.course.engine_tour`) runs the sweep once, then its slider picks the prompt whose timeline is drawn. The left panel is the prefill's throughput, the right one each lane's busy time as a share of the step, and below is the chosen prompt's timeline.

# %%
mixtral, rtx4090 = load_spec("mixtral-8x7b"), load_profile("rtx4090-desktop")
explorer = et.PromptExplorer(mixtral, rtx4090, (16, 32, 64, 128, 256, 512, 1024, 2048, 4096), prompt=512)
display(explorer)

# %% [markdown]
# What the slider shows:
#
# - **Short prompts are bound by the link.** Whatever the prompt, every expert row that is not resident has to reach some processor: streamed over PCIe (`h2d`) or read from DRAM by the CPU. At 16 tokens that costs nearly as much as at 256, so the prefill's tokens/s grows almost in proportion to the prompt.
# - **Long prompts give the GPU work.** The `gpu` lane's share grows with the prompt (its compute grows with the tokens; the bytes do not), while `cpu` and `h2d` stay almost always busy: the balance rule keeps giving both lanes rows until they finish together.
# - The same plan serves every prompt: the placement (GG rows) is fixed, only the token assignment's split changes per step.
#
# The claims, checked on the sweep:

# %%
pts = {p.prompt: p for p in explorer.points}
tps = [p.prompt / p.step_s for p in explorer.points]
assert all(a < b for a, b in zip(tps, tps[1:], strict=False)), "prefill tokens/s should grow with the prompt"
assert pts[4096].busy_s["gpu"] / pts[4096].step_s > 2 * pts[16].busy_s["gpu"] / pts[16].step_s
assert pts[16].busy_s["h2d"] / pts[16].step_s > 0.9
explorer.set(prompt=4096)
print(explorer.values(), "|", explorer.status.value.replace("<b>", "").replace("</b>", ""))

# %% [markdown]
# ### The same question on the timeline explorer
#
# The course's timeline explorer (`offloadkit.viz.dashboards.TimelineExplorer`) shows one step of any model, profile and policy, with each lane's utilisation and the bound (the busiest lane's unavoidable work) as a dashed line. Here it is on the same case, prefill phase; its `prompt` control runs from 16 to 4096 tokens. Unlike the sweep above, it plans again for every prompt (a plan for pp*N*+tg128, by the partition alone), as if the engine were reopened for each workload; try the other policies in its `policy` menu too.

# %%
board = TimelineExplorer(model="mixtral-8x7b", profile="rtx4090-desktop", policy="scheinfer", phase="prefill",
                         prompt=512, routing="zipf:1.2")
display(board)

# %% [markdown]
# Driven from code: the longest prompt, and what the figure shows, as numbers.

# %%
board.set(prompt=4096)
at = board.summary()
print(f"pp{board.values()['prompt']} prefill, {at['plan']} plan: {at['step_s']:.2f} s; the bound ({at['bound_lane']}'s "
      f"work) {at['bound_s']:.2f} s, {at['fraction_of_bound']:.0%} of the step  [simulated on {at['profile']}]")
print("utilisation:", ", ".join(f"{lane} {u:.0%}" for lane, u in at["utilisation"].items()))
assert at["source"] == "simulated" and at["utilisation"]["gpu"] > 0.2

# %% [markdown]
# ## What's next
#
# [Chapter 09](09_benchmarks.ipynb) measures offloadkit's CPU engine against the real llama.cpp on the same weights and simulates the paper's experiment; [00 · Quickstart](00_quickstart.ipynb) runs the whole path on this machine in a few cells.
