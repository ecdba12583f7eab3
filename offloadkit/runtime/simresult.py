"""What a simulation returns: the Timeline, per-step times, lane busy times, and a labelled summary.

:class:`SimResult` accumulates per-step figures while the simulator runs (so the summary does not
need the per-task timeline, which ``record=False`` skips) and prints the table the ``simulate`` CLI
shows. Every figure here is **simulated** on a named hardware profile and says so: ``table()`` puts
"simulated on <profile>" in its first line; nothing here may be shown as a measurement.

A prefill in ``ubatch`` chunks is several steps numbered 0; ``prefill_s`` is their sum.
Throughput follows llama-bench: prefill tokens/s = batch x prompt / prefill time; decode tokens/s =
batch x generated tokens / time of the decode steps. The *bounding lane* of a phase is the lane with
the most busy time in it: the resource that a better plan would have to relieve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from offloadkit.plan.plans import Workload
from offloadkit.runtime.timeline import LANES, Timeline


@dataclass
class SimResult:
    """One simulated run; times in seconds of virtual time."""

    timeline: Timeline
    workload: Workload
    model: str
    plan: str
    profile: str
    step_s: list[float] = field(default_factory=list)
    n_prefill_steps: int = 0
    busy_prefill_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LANES, 0.0))
    busy_decode_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LANES, 0.0))
    logits: list[Any] = field(default_factory=list)  # numerics only: [B, V] per step
    tokens: list[Any] = field(default_factory=list)  # numerics only: greedy token ids [B, 1] per step

    def add_step(self, step: int, seconds: float, lanes: Sequence[int], durs: Sequence[float]) -> None:
        """Account a step that took ``seconds``, from its tasks' lane indices (into ``LANES``) and durations."""
        sums = [0.0] * len(LANES)
        for ln, d in zip(lanes, durs, strict=True):
            sums[ln] += d
        self.add_step_busy(step, seconds, sums)

    def add_step_busy(self, step: int, seconds: float, busy_by_lane: Sequence[float]) -> None:
        """Account a step from its busy seconds per lane (in ``LANES`` order)."""
        self.step_s.append(seconds)
        self.n_prefill_steps += step == 0
        busy = self.busy_prefill_s if step == 0 else self.busy_decode_s
        for lane, s in zip(LANES, busy_by_lane, strict=True):
            busy[lane] += s

    # ---- figures -------------------------------------------------------------------------------------

    @property
    def prefill_s(self) -> float:
        return sum(self.step_s[:self.n_prefill_steps])

    @property
    def decode_s(self) -> float:
        return sum(self.step_s[self.n_prefill_steps:])

    @property
    def total_s(self) -> float:
        return sum(self.step_s)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.workload.batch * self.workload.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.workload.batch * self.workload.gen_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def busy_s(self) -> dict[str, float]:
        return {lane: self.busy_prefill_s[lane] + self.busy_decode_s[lane] for lane in LANES}

    def bounding_lane(self, phase: str = "total") -> str:
        """The busiest lane of ``"prefill"``, ``"decode"`` or ``"total"``."""
        busy = {"prefill": self.busy_prefill_s, "decode": self.busy_decode_s, "total": self.busy_s}[phase]
        return max(busy, key=busy.__getitem__)

    @property
    def label(self) -> str:
        return self.timeline.label

    def summary(self) -> dict[str, Any]:
        """The figures as a flat dict (for JSON and notebooks); ``source`` says they are simulated.

        Prefill only (``gen_tokens == 0``): the decode rate and bounding lane are ``None``, not 0 and a guess."""
        decodes = self.workload.gen_tokens > 0
        return {"source": "simulated", "profile": self.profile, "model": self.model, "plan": self.plan,
                "workload": self.workload.label, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "total_s": self.total_s, "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s if decodes else None, "busy_s": self.busy_s,
                "bounding_lane": {p: self.bounding_lane(p) if decodes or p != "decode" else None
                                  for p in ("prefill", "decode", "total")}}

    def table(self) -> str:
        """A plain-text table, labelled **simulated** on the profile."""
        w = self.workload
        rows = [("prefill", w.batch * w.prompt_tokens, self.prefill_s, self.prefill_tokens_per_s,
                 self.busy_prefill_s, "prefill"),
                ("decode", w.batch * w.gen_tokens, self.decode_s, self.decode_tokens_per_s, self.busy_decode_s,
                 "decode")][:2 if w.gen_tokens else 1]  # prefill only (gen 0, llama-bench -n 0): no decode row
        out = [f"{self.model} · plan {self.plan} · {w.label}, batch {w.batch} — simulated on {self.profile}",
               f"{'phase':<8} {'tokens':>7} {'time s':>10} {'tokens/s':>10}  "
               + "  ".join(f"{lane + ' busy':>10}" for lane in LANES) + "  bound by"]
        for name, tokens, secs, tps, busy, phase in rows:
            out.append(f"{name:<8} {tokens:>7} {secs:>10.4f} {tps:>10.2f}  "
                       + "  ".join(f"{busy[lane]:>10.4f}" for lane in LANES) + f"  {self.bounding_lane(phase)}")
        total = self.busy_s
        out.append(f"{'total':<8} {w.batch * (w.prompt_tokens + w.gen_tokens):>7} {self.total_s:>10.4f} {'':>10}  "
                   + "  ".join(f"{total[lane]:>10.4f}" for lane in LANES) + f"  {self.bounding_lane()}")
        return "\n".join(out)


__all__ = ["SimResult"]
