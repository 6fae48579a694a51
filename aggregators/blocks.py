"""Column ranges and CPU worker threads shared by the heavy kernels.

The kernels that touch every value of an ``(n, d)`` stack (Gram matrices, per-coordinate sorting,
distances, weighted sums) walk it in blocks of columns or rows. On CPU they run numpy kernels
(OpenBLAS, numpy's SIMD sort, ufuncs), which release the GIL, in up to ``torch.get_num_threads()``
Python threads: each thread takes one contiguous range, reuses its own scratch buffers (a fresh
allocation per block costs page faults), and returns a partial result that the caller combines in
range order, so a result never depends on thread timing.

Why not torch's own intra-op threads on CPU: on this project's loaded 2-core machine a 2-thread
torch ``float64`` matrix-vector product over a (50, 1e6) stack took 0.87 s against 0.07 s with one
thread (OpenMP workers spin while the other core is busy); threads that block, as these do, lose
nothing when a core is taken.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch
from threadpoolctl import ThreadpoolController
from torch import Tensor

R = TypeVar("R")

#: Below this many values per worker a thread costs more than it saves (~50 us to hand over).
MIN_VALUES_PER_WORKER: int = 1 << 18

#: dtypes whose CPU kernels run in numpy (other dtypes and devices use torch).
NUMPY_DTYPES = (torch.float32, torch.float64)

_numpy_kernels = True
_blas: Optional[ThreadpoolController] = None
_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter: Optional[object] = None
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_after_fork() -> None:
    # A forked child has none of the parent's pool threads (a task queued on the inherited pool
    # would wait forever) and none of its running kernels: start from scratch.
    global _pool, _pool_size, _pool_lock, _blas_lock, _blas_users, _blas_limiter
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()
    _blas_lock, _blas_users, _blas_limiter = threading.Lock(), 0, None


os.register_at_fork(after_in_child=_forget_after_fork)


def uses_numpy(updates: Tensor) -> bool:
    """Whether ``updates`` takes the numpy CPU kernels (CPU, float32 or float64)."""
    return _numpy_kernels and updates.device.type == "cpu" and updates.dtype in NUMPY_DTYPES


@contextmanager
def portable_kernels() -> Iterator[None]:
    """Within the block, run the torch kernels that other devices use on CPU too.

    For checking those kernels against the numpy ones on a machine without a GPU. Not
    thread-safe: it switches a module-wide flag.
    """
    global _numpy_kernels
    previous, _numpy_kernels = _numpy_kernels, False
    try:
        yield
    finally:
        _numpy_kernels = previous


def as_numpy(tensor: Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (no copy unless the tensor carries a lazy negation)."""
    return tensor.detach().resolve_neg().resolve_conj().numpy()


def worker_count(values: int, parts: int) -> int:
    """Threads worth using for ``values`` values split into at most ``parts`` independent parts.

    ``torch.get_num_threads()`` is the cap, so ``torch.set_num_threads(1)`` (or the benchmark's
    ``--threads 1``) makes every kernel single-threaded.
    """
    by_size = max(1, values // MIN_VALUES_PER_WORKER)
    return max(1, min(torch.get_num_threads(), by_size, parts))


def split_range(length: int, parts: int, align: int = 1) -> List[Tuple[int, int]]:
    """Cut ``range(length)`` into at most ``parts`` contiguous, near-equal ranges whose inner
    boundaries are multiples of ``align`` (so block boundaries do not move with the thread count)."""
    units = -(-length // align)
    parts = max(1, min(parts, units))
    bounds = [min(length, (units * k // parts) * align) for k in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def run_ranges(work: Callable[[int, int], R], ranges: Sequence[Tuple[int, int]]) -> List[R]:
    """``[work(lo, hi) for lo, hi in ranges]``, the ranges after the first in pool threads.

    The calling thread does the first range itself. Pool threads never wait on other tasks, so
    concurrent callers cannot deadlock. An exception in any range is re-raised here. numpy's
    overflow/invalid warnings are off inside (numpy error state is per thread): kernels report
    non-finite results through their values, which the rules check.
    """
    def quiet(lo: int, hi: int) -> R:
        with np.errstate(over="ignore", invalid="ignore"):
            return work(lo, hi)

    with _single_threaded_blas():
        if len(ranges) <= 1:
            return [quiet(lo, hi) for lo, hi in ranges]
        futures = [_executor(len(ranges) - 1).submit(quiet, lo, hi) for lo, hi in ranges[1:]]
        try:
            first = quiet(*ranges[0])
        finally:
            # Wait for every range before returning or raising: they write into the caller's buffers.
            done = [future.exception() for future in futures]
    errors = [error for error in done if error is not None]
    if errors:
        raise errors[0]
    return [first] + [future.result() for future in futures]


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """One BLAS thread per calling thread while kernels run (process-wide, reference counted).

    OpenBLAS serialises concurrent callers on its own thread pool: two worker threads each asking
    it for 2 threads ran a float64 Gram pass in 0.158 s against 0.088 s with 1 BLAS thread each.
    """
    global _blas, _blas_users, _blas_limiter
    with _blas_lock:
        if _blas_users == 0:
            if _blas is None:
                _blas = ThreadpoolController()
            _blas_limiter = _blas.limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_limiter is not None:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < threads:
            old = _pool
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="phalanx-agg")
            _pool_size = threads
            if old is not None:
                old.shutdown(wait=False)  # finishes the tasks already queued on it, then exits
        return _pool
