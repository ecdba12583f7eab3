"""The ``gpu`` lane's kernels: raw CUDA C in ``src/``, compiled by NVRTC, launched with CuPy on torch streams.

- ``src/*.cu`` — the kernels (each file opens with its launch shape and napkin math);
- :mod:`~offloadkit.kernels.cuda.nvrtc` — compile options and the driverless compile check;
- :mod:`~offloadkit.kernels.cuda.loader` — ``cupy.RawModule`` per file, launches on a torch stream;
- :mod:`~offloadkit.kernels.cuda.ops` — one checked launch wrapper per operation;
- :mod:`~offloadkit.kernels.cuda.twins` — each operation's CPU twin, its specification in torch;
- :mod:`~offloadkit.kernels.cuda.emulate` — the CUDA source run on the CPU (g++) where no GPU exists.

Importing this package loads nothing from CuPy: a machine without CUDA can compile and emulate.
"""
