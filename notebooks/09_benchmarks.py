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
# # 09 · Benchmarks: measured here, simulated on the paper's machines
#
# Every speedup of scheinfer in chapters 06 and 07 was **simulated**: offloadkit's cost model priced each task on a catalog profile of a machine with a GPU, and the simulator scheduled them. This chapter puts those numbers beside the only ones we can **measure** on the machine at hand, and keeps the two apart:
#
# 1. **measured**: a short benchmark with llama-bench's protocol, on this machine's CPU — offloadkit's CPU engine and, where it is built, the real llama.cpp, alternately, on the same weights. This is the CPU lane every hybrid plan leans on: scheinfer's claims against llama.cpp only mean something if our CPU lane is at least as fast as llama.cpp's;
# 2. **simulated**: the ScheInfer paper's experiment (arXiv 2411.15715) as `benchmarks/paper.py` simulated it on the catalog profiles, from `data/results/`;
# 3. a widget to pick a model, a profile and a phase, and see the speedups over llama.cpp, Fiddler and KTransformers, simulated and measured side by side, each labelled.
#
# The logic lives in the package: `offloadkit.bench.protocol` (the benchmark), `offloadkit.bench.report` (its figures and HTML page), `offloadkit.viz.benchmarks` (the simulated experiment and the widget). This notebook drives them.

# %%
import tempfile
from pathlib import Path

import torch

from offloadkit.bench import report
from offloadkit.bench.llamacpp import is_built
from offloadkit.bench.protocol import BenchSettings, default_threads, format_markdown, run_bench
from offloadkit.hardware.machine import cpu_model
from offloadkit.viz import benchmarks as vb

torch.set_num_threads(2)
threads = min(2, default_threads())
print(f"this machine: {cpu_model()}; the benchmark uses {threads} thread{'s' if threads > 1 else ''}")

# %% [markdown]
# ## 1. llama-bench's protocol, on the machine at hand
#
# A speed comparison on a shared machine means something only when both engines run the same work, under the same conditions, close together in time. `offloadkit bench` follows llama.cpp's own benchmark, `llama-bench`:
#
# - **the tests**: `pp64` is one forward of a 64-token prompt on an empty KV cache, computing the last position's logits only; `tg16` is 16 one-token forwards from an empty context. Tokens are random ids: no tokenizer, no sampling (tokens/s counts forwards), and one untimed warm-up per test;
# - **the same weights**: a benchmark model with random weights made deterministically on first use (`bench-moe-small`: Mixtral's architecture, 8 experts, top-2, 0.11 B parameters; the default `bench-moe` has about 1 B), exported to GGUF for llama.cpp, which runs as `llama-bench -ngl 0` on the same threads;
# - **alternation**: every round times one repetition of each engine, in alternating order, and keeps the ratio offloadkit / llama.cpp of that round. The ratio's mean ± sd is the comparison;
# - **the memory read**, measured before and after every pair: on this kind of machine the read bandwidth moves by up to 2× within an hour, so absolute tokens/s from two runs do not compare; ratios within one run do.
#
# Here: two repetitions of two short tests, a few seconds of measuring. `make bench` runs the full protocol (`-p 512 -n 128 -r 5`, threads 1 and 2, bf16 and f32, `bench-moe`) and writes the HTML report.

# %%
llamacpp_built = is_built()
engines = ("offloadkit", "llama.cpp") if llamacpp_built else ("offloadkit",)
settings = BenchSettings(models=["bench-moe-small"], dtypes=["bfloat16"], threads=[threads], n_prompt=[64],
                         n_gen=[16], repetitions=2, engines=engines)
run = run_bench(settings, progress=True)
print(format_markdown(run))

# %% [markdown]
# Without llama.cpp built the table holds offloadkit's rows only. llama.cpp is built from source, natively optimised for this CPU, the way its users build it; that takes a few minutes on two cores, once.

# %%
if llamacpp_built:
    print("llama.cpp is built here: the table above holds both engines, alternated, and their ratio (measured)")
else:
    print("llama.cpp is not built here, so there are no llama.cpp rows and no ratio.\n"
          "To add them: `make bench` (builds llama-bench from source, then measures both engines and writes the\n"
          "HTML report), or `make llamacpp` to build only, then run this notebook again.")
for note in run.meta.get("skipped", []):
    print(f"skipped: {note}")

# %% [markdown]
# ### The same run, drawn
#
# Tokens/s per test, mean ± sd over the repetitions (error bars), both engines where both ran; every title names the machine it was measured on.

# %%
report.speed_figure(run)

# %%
ratio = report.ratio_figure(run)  # None without llama.cpp rows
if ratio is None:
    print("no offloadkit / llama.cpp ratio without llama.cpp rows: `make bench` adds them")
else:
    ratio.show()

# %% [markdown]
# The memory read measured during the run. If it moved a lot between the first and the last measurement, so did the machine under both engines; that is why the comparison is the per-round ratio.

# %%
report.read_figure(run)

# %% [markdown]
# Where a step of offloadkit's engine spends its time: one measured prefill (64 tokens) and one decode step, one bar per task on the CPU lane (chapter 02 drew simulated ones the same way). In decode the routed experts and the lm_head read their weights once per token; in prefill the same weights serve 64 tokens, so the matrix products' arithmetic, not the memory read, sets the time.

# %%
steps = report.step_figures(run)
steps["prefill"]

# %%
steps["decode"]

# %% [markdown]
# `offloadkit bench --html report.html` writes all of this as one page that opens offline (plotly.js inlined): the table, the bars, the ratio, the read bandwidth, the two timelines and, when the run was given a profile (`--profile measure`), the simulator's prediction of each test against the measurement. The same page from this run:

# %%
page = report.write_html(run, Path(tempfile.mkdtemp()) / "bench-09.html")
print(f"{page} ({page.stat().st_size / 2**20:.1f} MiB, self-contained)")

# %% [markdown]
# ## 2. The paper's experiment, simulated
#
# `benchmarks/paper.py` ran every policy (scheinfer, llama.cpp's, Fiddler's and KTransformers' placement rules, CPU only, GPU only) on six models and four catalog machines with moderate GPUs, pp512 + tg128 at batch 1, under uniform, Zipf-skewed and recorded routing. Nothing there ran on hardware: every number is **simulated** by offloadkit's cost model on the named profile. The paper's own ranges (measured by its authors on their machines, quoted from its abstract) are shown beside ours, never mixed in.

# %%
paper = vb.PaperExperiment.load()
m = paper.meta
print(f"{m['title']}\n  {m['source']}: {m['command']} on {m['date']}, workload {m['workload']['label']}; "
      f"{len(paper.models())} models × {len(paper.profiles())} profiles")
print(f"\n{'over':<18}{'phase':<9}{'cases':>6}  {'simulated min / median / max':<30}the paper's range (its authors')")
for s in paper.summary:
    if s["n"]:
        lo, hi = s["paper_range"]
        print(f"{s['over']:<18}{s['phase']:<9}{s['n']:>6}  {s['min']:5.2f} / {s['median']:5.2f} / {s['max']:5.2f}×"
              f"{'':<9}{lo:.2f}–{hi:.2f}×")

# %% [markdown]
# ## 3. Speedups, simulated and measured
#
# Pick a model, a catalog profile and a phase. Left: scheinfer's speedup over each baseline (the baseline's time / scheinfer's) for every routing simulated for that case, solid bars, with the paper's reported range for the phase as a band; a baseline that cannot run the case (it does not fit the GPU, or does not apply: Fiddler on a dense model) is marked. Right, hatched: what we **measured** on this machine in section 1 for the same phase, offloadkit's CPU engine over the real llama.cpp (prefill: the pp test, decode: the tg test, overall: both combined round by round). The two panels answer different questions — a GPU plan on a catalog machine, simulated; two CPU engines here, measured — and are never drawn on one axis. The widget needs a live kernel (JupyterLab).

# %%
explorer = vb.SpeedupExplorer(paper, run, model="mixtral-8x7b", profile="rtx4090-desktop", phase="overall")
explorer.widget()

# %% [markdown]
# The same panel driven from code: each control is a plain value, and `set` redraws once.

# %%
explorer.set(model="mixtral-8x7b", profile="rtx4060ti16-desktop", phase="decode")
for t in explorer.fig.data:
    if str(t.meta).startswith("simulated:") and t.visible:
        cells = ", ".join(f"{x} {y:.2f}×" if y else f"{x} cannot run" for x, y in zip(t.x, t.y, strict=True))
        print(f"{t.name}: {cells}")
for s in vb.measured_speedups(run, "decode"):
    print(f"measured on {run.machine}: {s.label}: offloadkit / llama.cpp {s.mean:.2f} ± {s.sd:.2f}")
print(f"redrawn in {explorer.last_redraw_s * 1e3:.0f} ms (measured here)")

# %% [markdown]
# ## What the two kinds of numbers say
#
# - The **simulated** speedups are what offloadkit's cost model predicts for machines we do not have. They are as good as the cost model; `offloadkit bench` with a profile holds the simulator against this machine's measured CPU engine, test by test (simulated / measured, target ±15 %).
# - The **measured** ratio is the CPU lane's standing against llama.cpp's own CPU backend on the same weights. Issue 10's target is offloadkit / llama.cpp ≥ 1.0 for pp512 and tg128 in bf16 and f32 on `bench-moe`; `make bench` measures it on your machine.
