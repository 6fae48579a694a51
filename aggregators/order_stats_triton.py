"""GPU kernels (Triton) for the coordinate-wise rules: median, trimmed mean, mean around the median.

The counterpart of :mod:`aggregators.order_stats` (the CPU kernels), with the same results. A sort
is the wrong tool on a GPU: measured on an H100 at n=100, d=11.2M, ``torch.sort`` takes about 67
reads of the stack and ``torch.median`` 41 (issue 8). These kernels select instead of sorting:

1. each program loads a tile of ``(m, BLOCK_D)`` values once, so every coordinate's m values sit
   in registers (one read of the stack in all);
2. the values become order-preserving unsigned keys (the float bits, sign-folded), and the
   ``k``-th smallest key of each coordinate is built bit by bit from the top: a bit stays set when
   at most ``k`` keys lie below the candidate. That is 32 (float32) or 64 (float64) counting steps
   over values already in registers, exact, with no data movement;
3. the kept values are summed in float64 from counts against the selected thresholds (values
   strictly inside, plus the right number of copies of each threshold value for ties), never as a
   total minus the extremes, which an attacker's 1e30 would swallow;
4. the per-row counts (trimmed, outside the kept window) and the median's squared distances are
   reduced per program and summed by the caller; a per-program count of NaN/Inf values replaces a
   separate validation pass.

Each program walks tiles with a stride of the grid size, so the per-program partials stay small
(``programs x m``) whatever d is.

Triton is optional: without it, or after a kernel failed to compile or launch, the rules sort on
CUDA (:func:`supports`, :func:`falls_back_to_sorting`). The kernels themselves live in
:mod:`aggregators.order_stats_kernels`, imported on the first launch, so that importing
:mod:`aggregators` does not import Triton. With ``TRITON_INTERPRET=1`` set before that first
launch the kernels run in Triton's interpreter on CPU tensors, which is how the test
suite checks them on machines without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, TypeVar

import torch
from torch import Tensor

#: Whether Triton is installed (found without importing it: the import costs ~0.2 s).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

#: Largest number of rows the kernels take: every coordinate's rows live in one thread's
#: registers, and beyond this they would spill. Larger stacks use the sorting path.
MAX_ROWS = 256

#: Columns per tile and warps per program. Not yet timed on a GPU (``benchmarks/gpu_reads.py
#: --sweep`` does); chosen from ``benchmarks/triton_resources.py`` (Triton 3.9, sm_90, 128 padded
#: rows): 8 warps split each column over two threads and spill least, 1.7 KB per thread against
#: 2.3-2.8 KB for the one-thread-per-column settings.
BLOCK_D = 128
NUM_WARPS = 8

_on_cpu = False
_failure: Optional[str] = None

R = TypeVar("R")


class KernelUnavailable(RuntimeError):
    """Triton could not compile or launch a kernel on this machine (no compiler, too few
    resources...); the kernels are switched off for the rest of the process."""


def failure() -> Optional[str]:
    """Why the kernels were switched off, or None while they work."""
    return _failure


def falls_back_to_sorting(call: Callable[..., R]) -> Callable[..., R]:
    """Decorate a rule's ``__call__``: when a kernel fails, call again, now on the sorting path.

    A broken Triton install (a missing ``ptxas``, an unsupported GPU) must not cost a round: the
    first failure is logged, the kernels are switched off, and the rule runs as without Triton,
    with the full input validation of that path.
    """

    @functools.wraps(call)
    def wrapper(*args, **kwargs):
        try:
            return call(*args, **kwargs)
        except KernelUnavailable:
            return call(*args, **kwargs)

    return wrapper


def supports(updates: Tensor, rows: int) -> bool:
    """Whether the kernels take this stack: float32/64 on CUDA (or on CPU inside
    :func:`interpreted_on_cpu`), at most :data:`MAX_ROWS` rows, and no kernel has failed."""
    if not TRITON_INSTALLED or _failure is not None or updates.dtype not in (torch.float32, torch.float64) or not 1 <= rows <= MAX_ROWS:
        return False
    return updates.device.type == "cuda" or (_on_cpu and updates.device.type == "cpu")


@contextmanager
def interpreted_on_cpu() -> Iterator[None]:
    """Within the block, CPU stacks that are not on the numpy kernels (inside
    :func:`aggregators.blocks.portable_kernels`) take these kernels, run by Triton's interpreter.

    For checking the kernels on a machine without a GPU. Needs ``TRITON_INTERPRET=1`` set before the
    kernels' first launch (the test suite's conftest sets it where there is no GPU). Not
    thread-safe: it switches a module-wide flag.
    """
    global _on_cpu
    if not TRITON_INSTALLED or os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("interpreted_on_cpu needs Triton and TRITON_INTERPRET=1 set before the first launch")
    previous, _on_cpu = _on_cpu, True
    try:
        yield
    finally:
        _on_cpu = previous


def _programs(device: torch.device, tiles: int) -> int:
    if device.type == "cuda":
        # A few resident programs per multiprocessor hide the load latency.
        return max(1, min(tiles, 8 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(tiles, 4))


def _launch(kernel: str, programs: int, *args, **meta) -> None:
    """Launch the kernel named ``kernel`` on ``programs`` programs (importing Triton and the
    kernels on first use); on any failure switch the kernels off."""
    global _failure
    try:
        from aggregators import order_stats_kernels

        getattr(order_stats_kernels, kernel)[(programs,)](*args, **meta)
    except Exception as exc:  # noqa: BLE001 - compiler and driver errors have no common type
        _failure = f"{type(exc).__name__}: {exc}"
        logging.getLogger(__name__).warning(
            "Triton selection kernel failed (%s); the coordinate-wise rules sort from now on", _failure
        )
        raise KernelUnavailable(_failure) from exc


def _launch_shape(updates: Tensor, m: int, block: int) -> tuple[int, int, int]:
    d = updates.shape[1]
    tiles = -(-d // block)
    return tiles, _programs(updates.device, tiles), max(16, 1 << (m - 1).bit_length())


def _rows_arg(updates: Tensor, rows: Optional[Tensor]) -> Tensor:
    if rows is None:
        return torch.zeros(1, dtype=torch.int64, device=updates.device)
    return rows.to(device=updates.device, dtype=torch.int64).contiguous()


def kept_mean(
    updates: Tensor, k_low: int, k_high: int, vector: Tensor, with_sq_distances: bool,
    block: Optional[int] = None, num_warps: Optional[int] = None,
) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """Mean of the order statistics ``k_low..k_high`` of every column of ``updates`` into ``vector``.

    Trimmed mean: ``k_low = f``, ``k_high = n - f - 1``; median: the middle one or two ranks.

    ``block`` and ``num_warps`` are launch settings (results do not depend on them; None:
    :data:`BLOCK_D`, :data:`NUM_WARPS`).

    Returns
    -------
    tuple or None
        ``outside``: (n,) int64 columns where the row was strictly below the ``k_low``-th or above
        the ``k_high``-th value; ``sq_distances``: (n,) float64 squared distances to ``vector`` as
        stored, or None unless asked for. None if ``updates`` holds NaN or Inf (``vector`` is
        then partly written).
    """
    m, d = updates.shape
    tiles, programs, m_pad = _launch_shape(updates, m, block or BLOCK_D)
    outside = torch.zeros((programs, m_pad), dtype=torch.int32, device=updates.device)
    sq = torch.zeros((programs, m_pad), dtype=torch.float64, device=updates.device) if with_sq_distances else outside
    bad = torch.empty(programs, dtype=torch.int32, device=updates.device)
    is_f64 = updates.dtype == torch.float64
    _launch(
        "kept_mean_kernel", programs, updates, _rows_arg(updates, None), vector, outside, sq, bad,
        m, d, updates.stride(0), updates.stride(1), k_low, k_high, tiles, programs,
        HAS_ROWS=False, WITH_SQ=with_sq_distances, IS_F64=is_f64,
        BITS=64 if is_f64 else 32, M_PAD=m_pad, BLOCK=block or BLOCK_D, num_warps=num_warps or NUM_WARPS,
    )
    if bool(bad.any()):
        return None
    counts = outside.sum(dim=0, dtype=torch.int64)[:m]
    return counts, (sq.sum(dim=0)[:m] if with_sq_distances else None)


def closest_mean(
    updates: Tensor, rows: Optional[Tensor], keep: int, vector: Tensor, block: Optional[int] = None, num_warps: Optional[int] = None
) -> Optional[Tensor]:
    """Per column of ``updates[rows]`` (all rows when None), the mean of the ``keep`` values
    nearest the median, into ``vector``.

    Returns
    -------
    Tensor or None
        ``(m,)`` int64 columns where the row was not kept (values equal to the kept window's
        ends count as kept). None if the rows hold NaN or Inf.
    """
    d = updates.shape[1]
    m = updates.shape[0] if rows is None else int(rows.numel())
    tiles, programs, m_pad = _launch_shape(updates, m, block or BLOCK_D)
    outside = torch.zeros((programs, m_pad), dtype=torch.int32, device=updates.device)
    bad = torch.empty(programs, dtype=torch.int32, device=updates.device)
    is_f64 = updates.dtype == torch.float64
    _launch(
        "closest_mean_kernel", programs, updates, _rows_arg(updates, rows), vector, outside, bad,
        m, d, updates.stride(0), updates.stride(1), keep, tiles, programs,
        HAS_ROWS=rows is not None, IS_F64=is_f64,
        BITS=64 if is_f64 else 32, M_PAD=m_pad, BLOCK=block or BLOCK_D, num_warps=num_warps or NUM_WARPS,
    )
    if bool(bad.any()):
        return None
    return outside.sum(dim=0, dtype=torch.int64)[:m]
