"""Every policy on one (model, profile, workload, routing), simulated side by side, with the bound.

:func:`compare_policies` builds each policy's plan (:mod:`offloadkit.plan.policies`), simulates it,
and computes the phase bounds (:mod:`offloadkit.plan.bounds`). A policy that cannot run the model on
the profile (it does not fit, or does not apply) is kept as a row with its reason, not dropped.
:class:`Comparison` gives the rows ``offloadkit simulate --json`` writes, the speedups of ScheInfer over
each other policy per phase, and a plain-text table. Every figure is **simulated** on the named profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from offloadkit.errors import PlanError
from offloadkit.model.spec import ModelSpec
from offloadkit.plan.bounds import PhaseBound, workload_bounds
from offloadkit.plan.partition import partition
from offloadkit.plan.plans import Plan, Workload, check_fits
from offloadkit.plan.policies import POLICIES, make_plan
from offloadkit.plan.routing import Routing, parse_routing
from offloadkit.runtime.sim import simulate
from offloadkit.runtime.simresult import SimResult

PHASES = ("prefill", "decode", "overall")
#: Decode steps a ``quick`` comparison simulates (their time is scaled to the workload's).
QUICK_DECODE_STEPS = 16


@dataclass
class PolicyRun:
    """One policy's plan and simulated result, or why it could not run."""

    policy: str
    plan: Plan | None
    result: SimResult | None
    error: str | None = None
    decode_scale: float = 1.0  # quick comparisons simulate some decode steps and scale their time by this

    def seconds(self, phase: str) -> float | None:
        r = self.result
        if r is None:
            return None
        decode = r.decode_s * self.decode_scale
        return {"prefill": r.prefill_s, "decode": decode, "overall": r.prefill_s + decode}[phase]


@dataclass
class Comparison:
    """The runs of several policies on one case, with the bounds of each phase."""

    model: str
    profile: str
    workload: Workload
    routing: str
    runs: dict[str, PolicyRun]
    bounds: dict[str, PhaseBound] = field(default_factory=dict)
    note: str = ""  # how the figures were obtained when not by simulating the whole workload

    def phases(self) -> list[str]:
        return [p for p in PHASES if p != "decode" or self.workload.gen_tokens]

    def tokens(self, phase: str) -> int:
        w = self.workload
        return w.batch * {"prefill": w.prompt_tokens, "decode": w.gen_tokens,
                          "overall": w.prompt_tokens + w.gen_tokens}[phase]

    def rows(self) -> list[dict[str, Any]]:
        """One row per (policy, phase): the ``simulate --json`` schema; a policy that cannot run has
        ``seconds = tokens_per_s = None`` and its ``error``."""
        out = []
        for name, run in self.runs.items():
            for phase in self.phases():
                s = run.seconds(phase)
                b = self.bounds.get(phase)
                tokens = self.tokens(phase)
                row = {"model": self.model, "profile": self.profile, "policy": name, "phase": phase, "tokens": tokens,
                       "seconds": s, "tokens_per_s": tokens / s if s else None,
                       "bound_tokens_per_s": b.tokens_per_s if b else None,
                       "fraction_of_bound": b.seconds / s if b and s else None,
                       "bounding_lane": b.bounding_lane if b else None, "routing": self.routing,
                       "workload": self.workload.label, "source": "simulated"}
                if self.note:
                    row["note"] = self.note
                if run.error:
                    row["error"] = run.error
                out.append(row)
        return out

    def speedup(self, over: str, phase: str, of: str = "scheinfer") -> float | None:
        """``of``'s speed over ``over``'s in ``phase`` (their time ratio), or None if either did not run."""
        a, b = self.runs.get(of), self.runs.get(over)
        if a is None or b is None:
            return None
        sa, sb = a.seconds(phase), b.seconds(phase)
        return sb / sa if sa and sb else None

    def table(self) -> str:
        """Plain text, labelled simulated, with tokens/s per phase, the bound, and speedups of scheinfer."""
        phases = self.phases()
        head = (f"{self.model} · {self.workload.label} · routing {self.routing} — simulated on {self.profile} "
                f"(cost model, not a measurement)" + (f"; {self.note}" if self.note else ""))
        lines = [head, f"{'policy':<15} {'plan':<22}" + "".join(f" {p + ' tok/s':>15}" for p in phases)
                 + "".join(f" {'x ' + p:>10}" for p in phases)]
        for name, run in self.runs.items():
            if run.result is None:
                lines.append(f"{name:<15} {'-':<22} cannot run: {run.error}")
                continue
            tps = [self.tokens(p) / run.seconds(p) for p in phases]  # type: ignore[operator]
            sp = [self.speedup(name, p) for p in phases]
            lines.append(f"{name:<15} {run.plan.name if run.plan else '-':<22}" + "".join(f" {v:>15.2f}" for v in tps)
                         + "".join(f" {v:>9.2f}x" if v else f" {'-':>10}" for v in sp))
        if self.bounds:
            lines.append(f"{'bound':<15} {'(no placement beats)':<22}"
                         + "".join(f" {self.bounds[p].tokens_per_s:>15.2f}" for p in phases if p in self.bounds)
                         + "   bound by " + ", ".join(f"{p}: {self.bounds[p].bounding_lane}" for p in phases
                                                    if p in self.bounds))
        lines.append("x phase: the speedup of scheinfer over that policy (its time / scheinfer's).")
        return "\n".join(lines)


def compare_policies(spec: ModelSpec, profile: Any, workload: Workload, routing: Routing | str | None = None,
                     policies: Sequence[str] = POLICIES, seed: int = 0, with_bounds: bool = True,
                     quick: bool = False) -> Comparison:
    """Plan and simulate every policy in ``policies`` on one case; see the module docstring.

    ``quick`` (for widgets): plans come from the workload as asked, but only the first
    :data:`QUICK_DECODE_STEPS` decode steps are simulated and their time scaled to all of them, and
    scheinfer's plan is the partition alone (no search from the baselines' placements, no repair moves).
    The comparison's ``note`` says so."""
    routing = parse_routing(routing, seed) if routing is None or isinstance(routing, str) else routing
    runs: dict[str, PolicyRun] = {}
    sim_w, scale, note = workload, 1.0, ""
    if quick and workload.gen_tokens > QUICK_DECODE_STEPS:
        sim_w = Workload(workload.prompt_tokens, QUICK_DECODE_STEPS, workload.batch)
        scale = workload.gen_tokens / QUICK_DECODE_STEPS
        note = f"decode time from the first {QUICK_DECODE_STEPS} of {workload.gen_tokens} steps, scaled"
    for name in policies:
        try:
            if quick and name == "scheinfer":
                plan = partition(spec, profile, workload, routing, polish_evals=0)
            else:
                plan = make_plan(name, spec, profile, workload, routing)
            runs[name] = PolicyRun(name, plan, simulate(spec, profile, plan, sim_w, routing, record=False,
                                                        check_memory=False), decode_scale=scale)
            check_fits(plan, spec, profile, workload)  # the plan must fit the workload asked, not the sample
        except PlanError as e:
            if name not in POLICIES:
                raise
            runs[name] = PolicyRun(name, None, None, str(e))
    bounds = {}
    if with_bounds and profile.gpu is not None and profile.link is not None:
        bounds = workload_bounds(spec, profile, workload, routing)
    return Comparison(spec.name or spec.arch, profile.name, workload, getattr(routing, "label", "trace"), runs, bounds,
                      note)


__all__ = ["PHASES", "QUICK_DECODE_STEPS", "Comparison", "PolicyRun", "compare_policies"]
