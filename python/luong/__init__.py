"""luong: Keras's `Attention` layer (Luong dot-product and concat attention) in Rust.

    >>> import numpy as np, luong
    >>> q = np.ones((2, 3, 4), np.float32); v = np.ones((2, 5, 4), np.float32)
    >>> luong.Attention()([q, v]).shape
    (2, 3, 4)
"""

from __future__ import annotations

from . import _core
from .layer import Attention, attention, attention_vjp

__version__: str = _core.__version__

__all__ = [
    "Attention",
    "attention",
    "attention_vjp",
    "set_num_threads",
    "get_num_threads",
    "kernel_isa",
    "parallel_backend",
    "__version__",
]


def set_num_threads(threads: int) -> None:
    """Sets the number of worker threads luong computes on (results never depend on it)."""
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"`threads` must be an int, received {threads!r}")
    if threads < 1:
        raise ValueError(f"`threads` must be at least 1, received {threads}")
    _core.set_num_threads(threads)


def get_num_threads() -> int:
    """The number of worker threads (from `LUONG_NUM_THREADS`, the machine, or the last set)."""
    return _core.get_num_threads()


def kernel_isa() -> str:
    """The instruction set luong's float32 kernels run on in this process: "amx" (AVX-512 with
    the two products on AMX tiles for the calls they win: dot scores, 24 MFLOP or more, blocks
    of 32 query rows or more, at most 2048 keys with returned weights), "avx512", "avx2", "neon"
    (aarch64) or "scalar".
    The best the CPU has, or what the environment variable `LUONG_ISA` asks for (tests and
    benchmarks use it to compare the paths; results agree within float32 rounding)."""
    return _core.kernel_isa()


def parallel_backend() -> str:
    """Where a parallel call made on this thread runs: "openmp" when it may join the calling
    thread's team of the OpenMP runtime the process has loaded (PyTorch's), which it does while
    that team's workers are running: they spin on after each torch op, and luong's own helpers
    would find their cores taken; between bursts, when they sleep, the call uses luong's pool.
    "luong" (always luong's pool) off Linux, when no OpenMP runtime is loaded globally, inside an
    OpenMP region, when that runtime is held to one thread (`torch.set_num_threads(1)`,
    `OMP_NUM_THREADS=1`), in a process forked after luong was imported, or with
    `LUONG_OPENMP=0`. Either way a call uses `get_num_threads()` threads and gives the same
    bits."""
    return _core.parallel_backend()
