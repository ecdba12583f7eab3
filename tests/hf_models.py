"""Tiny Hugging Face models of each supported architecture, and the parity check against them.

Tests import this to build a random transformers model of one architecture (with weights large
enough that routing and attention are decisive, not near-uniform), export it in the Hub layout
with ``save_pretrained``, and compare offloadkit's reference forward with transformers token by
token. transformers is a test-only dependency; nothing in the package imports it.

It does not read checkpoints itself beyond ``safetensors.torch.load_file`` (the package's
memory-mapped reader is tested elsewhere).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ARCHS = ("mixtral", "llama", "qwen2_moe", "phimoe")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|``: the relative error of ``a`` against the reference ``b``."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def hf_config(arch: str, **overrides: Any):
    """A small transformers config of ``arch``; ``overrides`` replace any field."""
    import transformers as tf

    base: dict[str, Any] = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                tie_word_embeddings=False)
    if arch == "mixtral":
        base.update(num_local_experts=6, num_experts_per_tok=2)
        cls = tf.MixtralConfig
    elif arch == "llama":
        cls = tf.LlamaConfig
    elif arch == "qwen2_moe":
        base.update(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
                    shared_expert_intermediate_size=40, norm_topk_prob=False)
        cls = tf.Qwen2MoeConfig
    elif arch == "phimoe":
        base.update(num_local_experts=6, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True)
        cls = tf.PhimoeConfig
    else:
        raise ValueError(f"unknown arch {arch!r}")
    base.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**base)


def longrope_params(head_dim: int, original_max: int, seed: int = 0) -> dict[str, Any]:
    """A PhiMoE-style longrope ``rope_parameters`` with distinct short / long factors and mscales."""
    g = torch.Generator().manual_seed(seed)
    short = (1.0 + torch.rand(head_dim // 2, generator=g)).tolist()
    long = (2.0 + 4.0 * torch.rand(head_dim // 2, generator=g)).tolist()
    return dict(rope_type="longrope", rope_theta=10000.0, short_factor=short, long_factor=long,
                short_mscale=1.15, long_mscale=1.35, original_max_position_embeddings=original_max)


def reinit_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Re-draw every weight with a larger spread than transformers' init, so that routing picks
    clear winners, attention is not uniform and logits are not tiny. Norm weights ~ 1 + N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif name.endswith("gate.weight") or "router" in name:  # router: decisive logits
                p.copy_(noise * 3.0 / p.shape[-1] ** 0.5)
            else:
                p.copy_(noise * std)
    return model


def build_hf_model(arch: str, seed: int = 0, std: float = 0.2, **overrides: Any):
    """A random transformers causal LM of ``arch`` in f32 eval mode."""
    import transformers as tf

    config = hf_config(arch, **overrides)
    torch.manual_seed(seed)
    # The eager experts loop is the code in modeling_<arch>.py; the default grouped_mm kernel refuses
    # hidden sizes whose rows are not 16-byte aligned, which the random shapes below produce.
    extra = {} if arch == "llama" else {"experts_implementation": "eager"}
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32, **extra)
    return reinit_(model, std, seed).eval()


def export(model, folder: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """``save_pretrained`` into ``folder`` (Hub layout); return (ModelSpec, weights by Hub name)."""
    from safetensors.torch import load_file
    from transformers.utils import logging as hf_logging

    from offloadkit.model.spec import ModelSpec

    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        weights.update(load_file(f))
    return ModelSpec.from_file(folder), weights


# ---- greedy decoding on both sides ---------------------------------------------------------------


@dataclass
class Run:
    """Logits of a prefill and of each decode step, the greedy tokens, and the routing seen."""

    logits: list[torch.Tensor] = field(default_factory=list)  # [B, T, V] for the prefill, [B, 1, V] after
    tokens: list[torch.Tensor] = field(default_factory=list)  # [B] per step
    experts: set[int] = field(default_factory=set)


def cache_argument(model) -> str:
    """The name ``model.forward`` takes the KV cache by: ``cache`` from transformers 5.24 on, where the
    old ``past_key_values`` raises a FutureWarning (removal announced for 5.40); before, ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def hf_greedy(model, prompt: torch.Tensor, steps: int) -> Run:
    from transformers import DynamicCache

    run = Run()
    cache = DynamicCache(config=model.config)
    name = cache_argument(model)
    ids = prompt
    for _ in range(steps + 1):
        out = model(input_ids=ids, use_cache=True, **{name: cache})
        cache = out[name]
        run.logits.append(out.logits.float())
        run.tokens.append(out.logits[:, -1].argmax(-1))
        ids = run.tokens[-1][:, None]
    return run


@torch.no_grad()
def ref_greedy(model, prompt: torch.Tensor, steps: int, max_len: int | None = None) -> Run:
    run = Run()
    cache = model.new_cache(prompt.shape[0], max_len)
    ids = prompt
    for _ in range(steps + 1):
        routing: dict[int, torch.Tensor] = {}
        logits = model.forward(ids, cache, routing=routing)
        for sel in routing.values():
            run.experts.update(sel.flatten().tolist())
        run.logits.append(logits)
        run.tokens.append(logits[:, -1].argmax(-1))
        ids = run.tokens[-1][:, None]
    return run


def compare(ours: Run, theirs: Run) -> float:
    """Assert identical greedy tokens step by step; return the worst logits relative error."""
    worst = 0.0
    for step, (a, b, ta, tb) in enumerate(zip(ours.logits, theirs.logits, ours.tokens, theirs.tokens, strict=True)):
        err = rel_err(a, b)
        assert err <= 1e-4, f"step {step}: logits relative error {err:.2e} > 1e-4"
        assert torch.equal(ta, tb), f"step {step}: greedy tokens differ: {ta.tolist()} vs {tb.tolist()}"
        worst = max(worst, err)
    return worst


def check_parity(hf_model, folder: Path, prompt_len: int = 16, steps: int = 8, batch: int = 1,
                 seed: int = 0, max_len: int | None = None) -> tuple[float, Run]:
    """Export ``hf_model``, run both sides (prefill + ``steps`` greedy decode steps), assert parity."""
    from offloadkit.model.reference import ReferenceModel

    spec, weights = export(hf_model, folder)
    ours = ReferenceModel(spec, weights)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, spec.vocab_size, (batch, prompt_len), generator=g)
    run = ref_greedy(ours, prompt, steps, max_len)
    return compare(run, hf_greedy(hf_model, prompt, steps)), run
