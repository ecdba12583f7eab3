"""The hybrid engine on a real GPU: the reference's tokens through CUDA streams, events and the CuPy kernels.

The loopback tests (tests/test_executor.py) prove the executor's ordering on CPU threads; these run the
same plans on ``CudaDevice``, where a missing event wait would read a buffer before its copy landed and
a staging buffer reused too early would corrupt an expert: both change the tokens. Every step's
measured schedule is also checked (``check=True``: data flow and staging reuse). Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from sim_fixtures import desktop, tiny

from offloadkit.kernels.cuda.loader import cupy_status
from offloadkit.model.reference import ReferenceModel
from offloadkit.plan.plans import Plan, Workload, all_gpu, plan_blocks

_OK, _WHY = cupy_status()
if _OK and not torch.cuda.is_available():
    _OK, _WHY = False, "CuPy sees a GPU but this torch is a CPU build: install a CUDA build of torch"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _OK, reason=f"GPU tests: {_WHY}")]


def _hybrid_plan(spec, staging: int, pinned: bool) -> Plan:
    """A third of every block's rows resident, the rest streamed in prefill (CPU in decode), half the KV on the GPU."""
    gg = {b.name: b.rows // 3 if b.rows else (b.layer or 0) % 2 for b in plan_blocks(spec)}
    kv = tuple(layer % 2 == 0 for layer in range(spec.n_layers))
    return Plan("test-hybrid", gg, kv, stream_min_tokens=4, staging_buffers=staging, pinned=pinned)


@pytest.mark.parametrize("arch", ["mixtral", "llama", "qwen2_moe", "phimoe"])
@pytest.mark.parametrize("staging, pinned, budget", [(1, True, None), (2, True, 0), (2, False, None)])
def test_cuda_engine_gives_the_reference_tokens(arch, staging, pinned, budget):
    from offloadkit.runtime.cuda_device import CudaDevice
    from offloadkit.runtime.engine import HybridEngine, measure_generation

    spec, weights = tiny(arch, layers=2)
    prompt = torch.randint(0, spec.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    want = ReferenceModel(spec, weights).greedy(prompt, 6)[0].tolist()
    plan = _hybrid_plan(spec, staging, pinned)
    with HybridEngine(spec, weights, plan, desktop(), CudaDevice(), workload=Workload(9, 6), check=True,
                      pinned_budget_bytes=budget, wait_s=30) as engine:
        run = measure_generation(engine, prompt, 6)
        lanes = {r.lane for r in run.timeline}
        assert engine.executor.streamer.mode == ("pageable" if not pinned else "ring" if budget == 0 else "pinned")
    assert run.tokens == want
    assert {"cpu", "gpu", "h2d", "d2h"} <= lanes
    assert run.timeline.source == "measured" and "loopback" not in run.timeline.machine


def test_cuda_engine_refuses_a_plan_over_the_memory_cap_before_allocating():
    from offloadkit.errors import PlanError
    from offloadkit.runtime.cuda_device import CudaDevice
    from offloadkit.runtime.engine import HybridEngine

    spec, weights = tiny("mixtral", layers=2)
    total = torch.cuda.mem_get_info()[1]
    device = CudaDevice(memory_fraction=max(1e-6, 2**20 / total))  # a 1 MiB GPU
    before = torch.cuda.memory_allocated()
    with pytest.raises(PlanError, match="over by"):
        HybridEngine(spec, weights, all_gpu(spec), desktop(), device, workload=Workload(4096, 4096))
    assert torch.cuda.memory_allocated() == before
