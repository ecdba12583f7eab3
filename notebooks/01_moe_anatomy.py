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
# # 01 · Anatomy of a Mixture-of-Experts model
#
# This is the first chapter of the offloadkit course. By its end you will know:
#
# 1. what a Mixture-of-Experts (MoE) transformer computes, layer by layer;
# 2. where its bytes and its FLOPs are, for the models the ScheInfer paper evaluates;
# 3. why Mixtral-8x7B does not fit a 24 GB card, and why that does not make it hopeless;
# 4. that offloadkit's model core runs a real checkpoint: a small Mixtral trained on Python's own documentation.
#
# offloadkit reimplements the engine of *Task Scheduling for Efficient Inference of Large Language Models on Single Moderate GPU Systems* (arXiv 2411.15715, "ScheInfer") **from its published description**: the cost model and the algorithms are offloadkit's own formulation, not the authors' code.
#
# Every figure in this course says whether it is **measured** (a real run on the machine named) or **simulated**/**computed** (from a config or a cost model).

# %%
import torch
from offloadkit.model.zoo import load_spec, zoo_names
from offloadkit.model.summary import format_breakdown, human
from offloadkit.viz import anatomy

torch.set_num_threads(2)
zoo_names()

# %% [markdown]
# ## 1. What a MoE layer computes
#
# A decoder layer of Mixtral is two residual sub-blocks:
#
# $$h = x + \mathrm{Attn}(\mathrm{RMSNorm}(x)), \qquad y = h + \sum_{e \in \mathrm{top}_k(r(h))} g_e(h)\, E_e(\mathrm{RMSNorm}(h))$$
#
# The **router** $r$ is one small matrix: it scores every expert for every token; each token keeps its top-$k$ (Mixtral: 2 of 8) and mixes their outputs with softmax weights $g_e$. Each **expert** is a SwiGLU feed-forward network,
#
# $$E(x) = W_2\,\big(\mathrm{silu}(W_1 x) \odot W_3 x\big),$$
#
# with $W_1, W_3 \in \mathbb{R}^{I \times H}$ and $W_2 \in \mathbb{R}^{H \times I}$. The other architectures vary the theme: Qwen-MoE adds a *shared expert* every token uses (gated by a sigmoid) and keeps some layers dense; PhiMoE routes with *sparsemixer* and uses LayerNorm with biases; LLaMA-2 is the dense case, one FFN per layer.
#
# `ModelSpec` reads all of this from a published `config.json` and lists every weight as a **block**: the unit the engine later places on the CPU or GPU and splits into row slices. One layer of Mixtral-8x7B:

# %%
mixtral = load_spec("mixtral-8x7b")
for label, nbytes in anatomy.layer_bytes_table(mixtral):
    print(f"{label:<20} {human(nbytes, 'B'):>12}")

# %% [markdown]
# ## 2. Where the bytes are
#
# Now all the paper's models, from their published configs (no weights needed). The breakdown below is computed, not measured: parameters × bytes per parameter of the stored dtype.

# %%
print(format_breakdown(mixtral))

# %%
specs = [load_spec(name) for name in zoo_names()]
anatomy.bytes_by_kind_figure(specs, gpu_gib=24)

# %% [markdown]
# In every MoE model, the routed experts are almost all of the bytes, and only the dense LLaMA-2 models put their bytes in one FFN that every token uses. That is the lever: **a token does not read most of a MoE model**.

# %%
anatomy.active_vs_total_figure(specs)

# %% [markdown]
# ## 3. FLOPs per token, and why bytes matter more
#
# A matrix-vector product with $P$ parameters costs $2P$ FLOPs and reads $P$ weights. At decode (one token per step) every weight a token uses is read for just 2 FLOPs, so decode is bound by **memory bandwidth**, not compute. The next cell does the back-of-the-envelope arithmetic for Mixtral-8x7B with **spec-sheet figures** (not measured, not simulated): an RTX 4090's 1008 GB/s of GDDR6X, a desktop's ~60 GB/s of dual-channel DDR5, and PCIe 4.0 x16's ~25 GB/s in practice.

# %%
active_bytes = mixtral.bytes_of(mixtral.active_params)
for what, gbps in [("GPU memory (RTX 4090, spec sheet)", 1008), ("CPU DRAM (DDR5 desktop, spec sheet)", 60),
                   ("PCIe 4.0 x16 (typical effective)", 25)]:
    print(f"reading one token's {human(active_bytes, 'B')} from {what:<38}: {active_bytes / (gbps * 1e9) * 1e3:7.1f} ms")
print(f"total weights {human(mixtral.total_bytes, 'B')} vs a 24 GiB card: {24 * 2**30 / mixtral.total_bytes:.0%} fits")

# %% [markdown]
# Three consequences drive the rest of the course:
#
# * **The model does not fit** a 24 GB card: about a quarter of it does. The rest lives in host memory.
# * **Streaming every expert over PCIe at decode is slow** (~1 s/token): the wire is the narrowest pipe.
# * **The CPU is not useless**: at decode it reads its share of the weights from DRAM about as fast as PCIe could send them, and it can do so *at the same time* as the GPU computes and the wire streams. ScheInfer's idea is to split every weight block three ways (CC on the CPU, CG streamed to the GPU, GG resident on the GPU) so all three lanes work at once. Chapter 02 simulates exactly that.

# %% [markdown]
# ## 4. A real checkpoint: the demo model
#
# The demo model has Mixtral's architecture (8 experts, top-2) at toy size. It was trained on this CPU from `pydoc_data/topics.py`, the help texts that ship with Python (the script is `data/models/demo-mixtral/train.py`). offloadkit opens its safetensors **memory-mapped** (bf16 stays bf16 on disk and in the map; the reference engine widens to f32 as it computes).

# %%
from offloadkit.runtime.engines import load_engine
from offloadkit.model.generate import SamplingConfig, stream_text

model, tok = load_engine("reference", "demo")
print(format_breakdown(model.spec))

# %%
new = stream_text(model, tok, 'The "if" statement is used for', max_new_tokens=48)

# %% [markdown]
# Sampling with a temperature and a seed gives varied but reproducible text:

# %%
new = stream_text(model, tok, "Exceptions", max_new_tokens=48, sampling=SamplingConfig(temperature=0.8, top_p=0.9, seed=1))

# %% [markdown]
# ## 5. The routers learned something
#
# A randomly initialized router sends tokens to experts almost uniformly. A trained one does not: some experts are hot, some are cold, and it differs by layer. This is **measured** by running the demo model over a paragraph and counting which experts each token chose. (Later chapters use exactly these popularity counts: a hot expert earns GPU memory.)

# %%
from offloadkit.model.expert_usage import expert_counts, normalized_entropy
from offloadkit.hardware.machine import machine_label

text = "The \"while\" statement is used for repeated execution as long as an expression is true. " * 3
counts = expert_counts(model, tok.encode(text))
for layer, c in counts.items():
    print(f"layer {layer}: normalized entropy {normalized_entropy(c):.2f} (1.00 = uniform)")
anatomy.expert_usage_figure(counts, f"demo model on {len(tok.encode(text))} tokens, {machine_label()}")

# %% [markdown]
# ## What's next
#
# [Chapter 02](02_hardware_and_simulation.ipynb) describes machines as **hardware profiles** (CPU, GPU, PCIe), builds the **task graph** of an inference step on four lanes (cpu, gpu, h2d, d2h) and simulates it, so you can watch a Mixtral-8x7B step on an RTX 4090 desktop, lane by lane.
