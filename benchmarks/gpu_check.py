"""The one script a session runs when it is lent a GPU: every check of offloadkit that needs CUDA, in order.

Sessions here get a GPU by chance and for a few minutes, so what needs one is prepared in advance
and run in one go. Each stage runs in its own process, so one failure leaves the others to report:

1. ``pytest -m gpu``: the CUDA kernels against their twins, the side-stream allocation race
   (``tests/test_cuda_streams.py``), the probe's device naming (``tests/test_probe_cuda.py``);
2. the probe on this device: the PCI bus id torch gives against what ``nvidia-smi -q`` prints,
   and H2D from pinned and from pageable host memory (every page written first);
3. ``benchmarks/cuda_kernels.py``: the kernels' effective GB/s against the device's own bandwidth.

Every figure it prints is **measured** on the GPU it names. Without CUDA it says so and exits 0.
Run: ``python benchmarks/gpu_check.py [--out DIR]`` (``--out``, or ``$OUT``: also write the log there).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import subprocess, torch
from offloadkit.hardware.probe_cuda import copy_gbps, link_name, smi_device_id
print("device 0:", torch.cuda.get_device_name(0))
ident = smi_device_id(0)
print("smi_device_id(0):", ident)
q = subprocess.run(["nvidia-smi", "-q", "--id=" + str(ident)], capture_output=True, text=True)
print("nvidia-smi -q for it:", next((l.strip() for l in q.stdout.splitlines() if "Bus Id" in l), q.stderr.strip()))
print("link:", link_name(0))
for pinned in (True, False):
    gbps = copy_gbps("h2d", pinned, 256 * 2**20)
    print(f"H2D {'pinned' if pinned else 'pageable'}, 256 MiB, best of 5: {gbps:.1f} GB/s (measured)")
"""

STAGES = (
    ("GPU tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                   "tests/test_cuda_kernels.py", "tests/test_cuda_streams.py", "tests/test_probe_cuda.py"]),
    ("probe on this device", [sys.executable, "-c", PROBE]),
    ("kernel benchmark", [sys.executable, "benchmarks/cuda_kernels.py", "--repeats", "20"]),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="also write gpu_check.log here")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("No CUDA here (torch.cuda.is_available() is False): nothing to check. The kernels are still "
              "compiled by NVRTC and emulated on the CPU by the test suite.")
        return 0
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    log, failed = [], []
    for name, cmd in STAGES:
        t0 = time.perf_counter()
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        text = (f"## {name}: exit {run.returncode} in {time.perf_counter() - t0:.0f} s\n"
                f"{run.stdout}{run.stderr}")
        print(text, flush=True)
        log.append(text)
        if run.returncode:
            failed.append(name)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.log").write_text("\n".join(log))
    print("failed stages: " + (", ".join(failed) if failed else "none"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
