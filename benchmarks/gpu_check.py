"""The one script a session runs when it is lent a GPU: every check of offloadkit that needs CUDA, in order.

Sessions here get a GPU by chance and for a few minutes, so what needs one is prepared in advance
and run in one go. Each stage runs in its own process, so one failure leaves the others to report:

1. ``pytest -m gpu``: the CUDA kernels against their twins, the side-stream allocation race
   (``tests/test_cuda_streams.py``), the probe's device naming (``tests/test_probe_cuda.py``), the CUDA
   device's streams, events, stamps and memory cap (``tests/test_cuda_device.py``), the hybrid engine's
   tokens through CUDA streams (``tests/test_executor_cuda.py``);
2. the probe on this device: the PCI bus id torch gives against what ``nvidia-smi -q`` prints,
   and H2D from pinned and from pageable host memory (every page written first);
3. ``benchmarks/cuda_kernels.py``: the kernels' effective GB/s against the device's own bandwidth;
4. ``benchmarks/hybrid_check.py``: the hybrid engine on a GPU capped to a moderate one, for the
   scheinfer, llamacpp and fiddler plans: greedy tokens against the reference's, pp and tg tokens/s
   measured beside the simulator's for the same plan on a profile measured here (``offloadkit profile``).

Every figure it prints is **measured** on the GPU it names, or **simulated** on a named profile.
``--device loopback`` runs only the stages that work on the loopback device (the hybrid engine on CPU
threads standing in for a GPU; its figures are never GPU figures) and says why it skips the others: it
rehearses this script where there is no GPU. With ``--device cuda`` (the default) and no CUDA it says so
and exits 0.
Run: ``python benchmarks/gpu_check.py [--device cuda|loopback] [--out DIR]`` (``--out``, or ``$OUT``: also
write the log there, and the hybrid engine's JSON, profile and timelines under ``DIR/hybrid``).
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


def stages(device: str, out: Path | None) -> list[tuple[str, list[str] | None, str]]:
    """(name, command, why it is skipped) per stage; the command is None where it is skipped."""
    py = sys.executable
    no_gpu = "needs a CUDA GPU; skipped on the loopback device"
    gpu_only = [
        ("GPU tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs",
                       "tests/test_cuda_kernels.py", "tests/test_cuda_streams.py", "tests/test_probe_cuda.py",
                       "tests/test_cuda_device.py", "tests/test_executor_cuda.py"]),
        ("probe on this device", [py, "-c", PROBE]),
        ("kernel benchmark", [py, "benchmarks/cuda_kernels.py", "--repeats", "20"]),
    ]
    out_args = ["--out", str(out / "hybrid")] if out is not None else []
    hybrid = ("hybrid engine", [py, "benchmarks/hybrid_check.py", "--device", device, *out_args])
    if device == "loopback":
        return [(name, None, no_gpu) for name, _ in gpu_only] + [(*hybrid, "")]
    return [(name, cmd, "") for name, cmd in [*gpu_only, hybrid]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "loopback"], default="cuda",
                        help="cuda: every stage; loopback: only the stages the loopback device can run")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="also write gpu_check.log (and hybrid/) here")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("No CUDA here (torch.cuda.is_available() is False): nothing to check. The kernels are still "
              "compiled by NVRTC and emulated on the CPU by the test suite; --device loopback rehearses the "
              "stages that do not need a GPU.")
        return 0
    out = Path(args.out) if args.out else None
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    log, failed = [f"# gpu_check --device {args.device}"], []
    for name, cmd, skipped in stages(args.device, out):
        if cmd is None:
            text = f"## {name}: skipped ({skipped})\n"
        else:
            t0 = time.perf_counter()
            run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            text = (f"## {name}: exit {run.returncode} in {time.perf_counter() - t0:.0f} s\n"
                    f"{run.stdout}{run.stderr}")
            if run.returncode:
                failed.append(name)
        print(text, flush=True)
        log.append(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.log").write_text("\n".join(log))
    print("failed stages: " + (", ".join(failed) if failed else "none"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
