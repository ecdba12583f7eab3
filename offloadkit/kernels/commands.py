"""Subcommands of ``offloadkit`` that belong to ``offloadkit.kernels`` (registered by ``offloadkit.cli``).

``offloadkit kernels compile [--arch 8.9 ...] [--kernel NAME ...] [--ptx-dir DIR]`` compiles the CUDA
kernels with NVRTC, which needs no GPU, and prints per kernel file and architecture whether it
compiled, its PTX and cubin sizes and the compile time; ``--ptx-dir`` writes the PTX files. It also
says whether CuPy could run them here. It refuses unknown kernel files and a ``--ptx-dir`` it could
not write (before compiling); a failed compile prints NVRTC's log and exits 1.
"""

from __future__ import annotations

import argparse


def cmd_kernels_compile(args: argparse.Namespace) -> int:
    from offloadkit.errors import OffloadkitError
    from offloadkit.hardware.machine import machine_label
    from offloadkit.kernels.cuda import nvrtc
    from offloadkit.kernels.cuda.loader import cupy_status
    from offloadkit.kernels.cuda.nvrtc import KERNELS
    from offloadkit.output_paths import check_output_folder

    ptx_dir = check_output_folder(args.ptx_dir, "--ptx-dir") if args.ptx_dir else None
    archs = args.arch or list(nvrtc.COMPUTE_CAPABILITIES)
    names = args.kernel or sorted(KERNELS)
    unknown = [n for n in names if n not in KERNELS]
    if unknown:
        raise OffloadkitError(f"no kernel file {', '.join(unknown)}; the kernels are: {', '.join(sorted(KERNELS))}")
    print(f"NVRTC {nvrtc.nvrtc_version()} (no GPU needed). {cupy_status()[1]}")
    print(f"compile times measured on {machine_label()}")
    print(f"{'kernel':<18} {'arch':>5} {'status':<8} {'kernels':>7} {'PTX':>10} {'cubin':>10} {'time':>7}")
    failures = []
    for name in names:
        for arch in archs:
            try:
                ptx = nvrtc.compile_kernel(name, arch, target="ptx")
                cubin = nvrtc.compile_kernel(name, arch, target="cubin")
            except nvrtc.KernelCompileError as e:
                failures.append(e)
                print(f"{name:<18} {arch:>5} {'FAILED':<8}")
                continue
            print(f"{name:<18} {arch:>5} {'ok':<8} {len(KERNELS[name]):>7} {len(ptx.image):>9,}B "
                  f"{len(cubin.image):>9,}B {ptx.seconds + cubin.seconds:>6.2f}s")
            if ptx_dir is not None:
                ptx_dir.mkdir(exist_ok=True)
                (ptx_dir / f"{name}.sm_{arch.replace('.', '')}.ptx").write_text(ptx.ptx)
    for e in failures:
        print(f"\n{e}")
    return 1 if failures else 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``offloadkit`` parser."""
    p = sub.add_parser("kernels", help="the CUDA kernels of the GPU lane")
    kernels_sub = p.add_subparsers(dest="kernels_command", required=True)
    c = kernels_sub.add_parser("compile", help="compile every CUDA kernel with NVRTC (no GPU needed)")
    c.add_argument("--arch", action="append", help="compute capability, e.g. 8.9 (repeatable; default: "
                   "8.0 8.6 8.9 9.0)")
    c.add_argument("--kernel", action="append", help="a kernel file, e.g. expert_swiglu (repeatable; default: all)")
    c.add_argument("--ptx-dir", help="write each PTX to this folder (created; its parent folder must exist) "
                                     "(default: not written)")
    c.set_defaults(func=cmd_kernels_compile)
