"""CPU expert kernels at memory-bandwidth speed: the benchmark of issue 4, runnable from a fresh clone.

    python benchmarks/cpu_experts.py            # markdown table (the same as `offloadkit bench kernels`)
    python benchmarks/cpu_experts.py --json     # JSON

It measures, in one run, the machine's memory read (offloadkit.hardware.stream), the decode kernel (n = 1..8,
bf16 and f32) against that read and against torch, and the prefill kernel (n = 32..512) against
torch's f32 GEMM, on a Mixtral-8x7B expert and on the demo model's expert. All logic lives in
:mod:`offloadkit.bench.kernels`; this script only parses arguments. Timings are never tests.
"""

from __future__ import annotations

import sys

from offloadkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "kernels", *sys.argv[1:]]))
