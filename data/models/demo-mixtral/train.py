"""Train the demo checkpoint: a small Mixtral-architecture model on Python's own documentation.

The text is the standard library's ``pydoc_data/topics.py`` (the help() topics, ~465 k characters),
so the data ships with every Python and nothing is downloaded. The model is offloadkit's own
reference forward (``offloadkit.model.reference``) over f32 parameters: the same code that later
checks every executor also trains the model, so there is no second implementation of Mixtral here.

    python data/models/demo-mixtral/train.py --out data/models/demo-mixtral   # ~15 min, 2 cores

It writes, in the Hugging Face layout: ``config.json``, ``model.safetensors`` (bf16),
``tokenizer.json`` (a byte-level BPE trained on the same text), ``generation_config.json`` and
``training_log.json`` (loss curve, routing statistics, wall time, machine). The result is
deterministic for a given seed, torch version and thread count, up to floating-point reduction
order.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import pydoc_data.topics
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from offloadkit.model.expert_usage import normalized_entropy
from offloadkit.model.reference import ReferenceModel
from offloadkit.model.spec import ModelSpec
from offloadkit.model.writer import make_config, write_checkpoint

SIZES = dict(layers=4, hidden=128, heads=4, kv_heads=2, experts=8, top_k=2, intermediate=256, vocab=2048)
AUX_COEF = 0.01  # Switch-Transformer load-balancing loss: keeps all experts in use while they specialize


class TrainingModel(ReferenceModel):
    """The reference forward, plus the router's load-balancing loss (training only).

    Without it a small router collapses onto two experts within a few steps. The loss is
    ``E * sum_e f_e * P_e`` per MoE layer (f: share of picks, P: mean router probability), as in
    Switch Transformer and transformers' ``load_balancing_loss_func``.
    """

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor]) -> None:
        super().__init__(spec, weights)
        self.aux_losses: list[torch.Tensor] = []

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        routed, experts = super().route(layer, x)
        if torch.is_grad_enabled():
            probs = torch.softmax(x @ self.w(f"{self.spec.moe_prefix(layer)}.gate.weight").T, dim=-1)
            picks = torch.zeros_like(probs).scatter_(1, experts, 1.0).mean(0) / self.spec.top_k
            self.aux_losses.append(self.spec.n_experts * (picks * probs.mean(0)).sum())
        return routed, experts


def corpus() -> str:
    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def train_tokenizer(text: str, vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    return tok


def init_weights(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """GPT-2 style init: N(0, 0.02), output projections scaled by 1/sqrt(2 * layers), norms at 1."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in spec.tensors().items():
        if name.endswith("norm.weight"):
            w = torch.ones(shape)
        else:
            std = 0.02 / math.sqrt(2 * spec.n_layers) if name.endswith(("o_proj.weight", "w2.weight")) else 0.02
            w = torch.randn(shape, generator=g) * std
        weights[name] = w.requires_grad_(True)
    return weights


def batches(ids: torch.Tensor, seq: int, batch: int, g: torch.Generator):
    while True:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + seq + 1] for s in starts.tolist()])
        yield x[:, :-1], x[:, 1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()

    text = corpus()
    tok = train_tokenizer(text, SIZES["vocab"])
    ids = torch.tensor(tok.encode(text).ids)
    n_val = len(ids) // 20
    train_ids, val_ids = ids[:-n_val], ids[-n_val:]
    config = make_config("mixtral", **SIZES, dtype="bfloat16", max_position_embeddings=1024,
                         bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"))
    spec = ModelSpec.from_config(config, "demo-mixtral")
    weights = init_weights(spec, args.seed)
    model = TrainingModel(spec, weights)
    opt = torch.optim.AdamW(list(weights.values()), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    warmup = max(args.steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0))))
    g = torch.Generator().manual_seed(args.seed)
    data = batches(train_ids, args.seq, args.batch, g)
    log: list[dict] = []
    bar = tqdm(range(args.steps), desc="training demo-mixtral")
    for step in bar:
        x, y = next(data)
        logits = model.forward(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, spec.vocab_size), y.reshape(-1))
        aux = torch.stack(model.aux_losses).mean()
        model.aux_losses.clear()
        opt.zero_grad(set_to_none=True)
        (loss + AUX_COEF * aux).backward()
        torch.nn.utils.clip_grad_norm_(list(weights.values()), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", aux=f"{aux.item():.3f}")
        if step % 100 == 0 or step == args.steps - 1:
            log.append({"step": step, "train_loss": round(loss.item(), 4), "aux_loss": round(aux.item(), 4),
                        "elapsed_s": round(time.time() - t_start, 1)})

    with torch.no_grad():
        val = val_ids[: (len(val_ids) - 1) // args.seq * args.seq + 1]
        vx, vy = val[:-1].view(-1, args.seq), val[1:].view(-1, args.seq)
        routing: dict[int, torch.Tensor] = {}
        val_loss = torch.nn.functional.cross_entropy(
            model.forward(vx, routing=routing).reshape(-1, spec.vocab_size), vy.reshape(-1)).item()
    entropy = {layer: round(normalized_entropy(torch.bincount(sel.flatten(), minlength=spec.n_experts)), 3)
               for layer, sel in routing.items()}
    final = {k: w.detach().to(torch.bfloat16) for k, w in weights.items()}
    write_checkpoint(args.out, config, final, tokenizer=tok)
    report = {
        "corpus": "pydoc_data/topics.py of Python " + platform.python_version(),
        "corpus_tokens": len(ids), "sizes": SIZES, "args": vars(args) | {"out": str(args.out)},
        "val_loss": round(val_loss, 4), "val_routing_normalized_entropy": entropy, "log": log,
        "wall_s": round(time.time() - t_start, 1), "machine": f"{platform.machine()}, {args.threads} threads",
        "torch": torch.__version__,
    }
    (args.out / "training_log.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"val loss {val_loss:.3f}; routing entropy {entropy}; {report['wall_s']} s")


if __name__ == "__main__":
    main()
