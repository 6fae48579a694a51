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
CUDA (:func:`supports`, :func:`falls_back_to_sorting`). With ``TRITON_INTERPRET=1`` set before this
module is imported the kernels run in Triton's interpreter on CPU tensors, which is how the test
suite checks them on machines without a GPU.
"""

from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, TypeVar

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None
    tl = None

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
    if triton is None or _failure is not None or updates.dtype not in (torch.float32, torch.float64) or not 1 <= rows <= MAX_ROWS:
        return False
    return updates.device.type == "cuda" or (_on_cpu and updates.device.type == "cpu")


@contextmanager
def interpreted_on_cpu() -> Iterator[None]:
    """Within the block, CPU stacks that are not on the numpy kernels (inside
    :func:`aggregators.blocks.portable_kernels`) take these kernels, run by Triton's interpreter.

    For checking the kernels on a machine without a GPU. Needs ``TRITON_INTERPRET=1`` before this
    module was imported (the test suite's conftest sets it where there is no GPU). Not
    thread-safe: it switches a module-wide flag.
    """
    global _on_cpu
    if triton is None or os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("interpreted_on_cpu needs Triton and TRITON_INTERPRET=1 set before aggregators is imported")
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


if triton is not None:

    @triton.jit
    def _all_ones_like(like, BITS: tl.constexpr):
        # Built from small constants: Triton's interpreter cannot write ~x or 2**64 - 1 unsigned.
        one = tl.full(like.shape, 1, like.dtype)
        top = one << (BITS - 1)
        return (top - one) | top

    @triton.jit
    def _sortable_keys(x, mask, IS_F64: tl.constexpr):
        """Unsigned keys that order as the floats do (negatives' bits inverted, positives' sign
        bit set). Masked-off entries get the largest key, so they never count as below, and read
        back as NaN (:func:`_key_values`), which every later comparison treats as absent: no mask
        needs to stay live."""
        if IS_F64:
            bits = x.to(tl.uint64, bitcast=True)
            ones = _all_ones_like(bits, 64)
            top = tl.full(bits.shape, 1, tl.uint64) << 63
            negative = (bits >> 63) == 1
        else:
            bits = x.to(tl.uint32, bitcast=True)
            ones = _all_ones_like(bits, 32)
            top = tl.full(bits.shape, 1, tl.uint32) << 31
            negative = (bits >> 31) == 1
        keys = tl.where(negative, bits ^ ones, bits | top)
        return tl.where(mask, keys, ones)

    @triton.jit
    def _key_values(keys, IS_F64: tl.constexpr):
        """Inverse of :func:`_sortable_keys`, elementwise."""
        # One return after both branches: the compiler would also build the code after a return
        # inside a constexpr if (and fail on the float32 bitcast of 64-bit keys).
        if IS_F64:
            top = tl.full(keys.shape, 1, tl.uint64) << 63
            values = tl.where((keys >> 63) == 1, keys ^ top, keys ^ _all_ones_like(keys, 64)).to(tl.float64, bitcast=True)
        else:
            top = tl.full(keys.shape, 1, tl.uint32) << 31
            values = tl.where((keys >> 31) == 1, keys ^ top, keys ^ _all_ones_like(keys, 32)).to(tl.float32, bitcast=True)
        return values

    @triton.jit
    def _two_kth_keys(keys, k_low, k_high, BITS: tl.constexpr, BLOCK: tl.constexpr, ONLY_LOW: tl.constexpr):
        """Per column of ``keys`` (rows x BLOCK), the ``k_low``-th and ``k_high``-th smallest key
        (0-based): the largest t with at most k keys below t, built from the top bit down. The two
        searches share the loop so their counting steps interleave; ``ONLY_LOW`` skips the second
        (``high`` is then returned as zeros)."""
        low = tl.zeros([BLOCK], keys.dtype)
        high = tl.zeros([BLOCK], keys.dtype)
        one = tl.full([BLOCK], 1, keys.dtype)
        for step in range(BITS):  # a loop, not unrolled: the body is already long
            bit = one << (BITS - 1 - step)
            try_low = low | bit
            below_low = tl.sum((keys < try_low[None, :]).to(tl.int32), axis=0)
            low = tl.where(below_low <= k_low, try_low, low)
            if not ONLY_LOW:
                try_high = high | bit
                below_high = tl.sum((keys < try_high[None, :]).to(tl.int32), axis=0)
                high = tl.where(below_high <= k_high, try_high, high)
        return low, high

    @triton.jit
    def _load_keys(
        x_ptr, rows_ptr, m, stride, col_stride, tile, d,
        HAS_ROWS: tl.constexpr, IS_F64: tl.constexpr, M_PAD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One tile as sortable keys, with its column indices and mask and its NaN/Inf count.

        The kernels get the values back from the keys with :func:`_key_values`, and the row
        indices, offsets and masks are rebuilt per tile, so that only the keys need to stay live
        through the selection (one register per value, two for float64): every thread holds a
        whole column, and anything per row would cost it a register per row.
        """
        r = tl.arange(0, M_PAD)
        row_ok = r < m
        if HAS_ROWS:
            source = tl.load(rows_ptr + r, mask=row_ok, other=0).to(tl.int64)
        else:
            source = r.to(tl.int64)
        cols = tile * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < d
        mask = row_ok[:, None] & col_ok[None, :]
        # The column stride is a runtime argument (never specialised to 1), so the compiler cannot
        # prove the columns contiguous and does not vectorise the load across columns: one column
        # per thread keeps every coordinate's values in one thread, and the counting steps reduce
        # in registers instead of across lanes. (The loads stay coalesced across the warp.)
        x = tl.load(x_ptr + source[:, None] * stride + cols[None, :] * col_stride, mask=mask, other=0.0)
        non_finite = mask & ((x != x) | (tl.abs(x) == float("inf")))
        return _sortable_keys(x, mask, IS_F64), cols, col_ok, tl.sum(tl.sum(non_finite.to(tl.int32), axis=1), axis=0)

    @triton.jit
    def _add_per_row(partials_ptr, pid, values, M_PAD: tl.constexpr):
        """Add a tile's per-row values to this program's row of partials (each program owns its
        row, so no atomics; nothing per row is held across tiles)."""
        slot = partials_ptr + pid * M_PAD + tl.arange(0, M_PAD)
        tl.store(slot, tl.load(slot) + values)

    # Integer arguments equal to 1 would otherwise be compiled in as constants (one kernel per
    # value), and arithmetic on them would then be Python's.
    @triton.jit(do_not_specialize=["m", "k_low", "k_high", "col_stride"])
    def _kept_mean_kernel(
        x_ptr, rows_ptr, vector_ptr, outside_ptr, sq_ptr, bad_ptr,
        m, d, stride, col_stride, k_low, k_high, tiles, programs,
        HAS_ROWS: tl.constexpr, WITH_SQ: tl.constexpr, IS_F64: tl.constexpr,
        BITS: tl.constexpr, M_PAD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Per column, the float64 mean of the order statistics ``k_low..k_high`` (0-based);
        per row, the columns where it fell outside them and (``WITH_SQ``) its squared distance
        to the output as stored."""
        pid = tl.program_id(0)
        bad = 0
        kept = (k_high - k_low + 1).to(tl.float64)
        # A while loop, not range(): Triton's interpreter cannot index with tensor bounds.
        tile = pid
        while tile < tiles:
            keys, cols, col_ok, non_finite = _load_keys(
                x_ptr, rows_ptr, m, stride, col_stride, tile, d, HAS_ROWS, IS_F64, M_PAD, BLOCK
            )
            bad += non_finite
            low_key, high_key = _two_kth_keys(keys, k_low, k_high, BITS, BLOCK, False)
            x = _key_values(keys, IS_F64)
            low = _key_values(low_key, IS_F64)
            high = _key_values(high_key, IS_F64)
            wide = x.to(tl.float64)
            # Padding reads back as NaN: false in every comparison below.
            inside = (x > low[None, :]) & (x < high[None, :])
            total = tl.sum(tl.where(inside, wide, 0.0), axis=0)
            # Ties: the kept ranks hold (#values <= low) - k_low copies of low and
            # k_high + 1 - (#values < high) copies of high.
            up_to_low = tl.sum((x <= low[None, :]).to(tl.int32), axis=0)
            below_high = tl.sum((x < high[None, :]).to(tl.int32), axis=0)
            total += (up_to_low - k_low).to(tl.float64) * low.to(tl.float64)
            total += (k_high + 1 - below_high).to(tl.float64) * high.to(tl.float64)
            total = tl.where(low == high, kept * low.to(tl.float64), total)
            out = (total / kept).to(x.dtype)
            tl.store(vector_ptr + cols, out, mask=col_ok)
            outside = (x < low[None, :]) | (x > high[None, :])
            _add_per_row(outside_ptr, pid, tl.sum(outside.to(tl.int32), axis=1), M_PAD)
            if WITH_SQ:
                diff = tl.where(x == x, wide - out.to(tl.float64)[None, :], 0.0)
                _add_per_row(sq_ptr, pid, tl.sum(diff * diff, axis=1), M_PAD)
            tile += programs
        tl.store(bad_ptr + pid, bad)

    @triton.jit(do_not_specialize=["m", "keep", "col_stride"])
    def _closest_mean_kernel(
        x_ptr, rows_ptr, vector_ptr, outside_ptr, bad_ptr,
        m, d, stride, col_stride, keep, tiles, programs,
        HAS_ROWS: tl.constexpr, IS_F64: tl.constexpr,
        BITS: tl.constexpr, M_PAD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Per column, the float64 mean of the ``keep`` values nearest the median (ties at the
        boundary distance: the values nearest the median on each side, below first); per row,
        the columns where it was not kept."""
        pid = tl.program_id(0)
        bad = 0
        # A while loop, not range(): Triton's interpreter cannot index with tensor bounds.
        tile = pid
        while tile < tiles:
            keys, cols, col_ok, non_finite = _load_keys(
                x_ptr, rows_ptr, m, stride, col_stride, tile, d, HAS_ROWS, IS_F64, M_PAD, BLOCK
            )
            bad += non_finite
            lower_key, upper_key = _two_kth_keys(keys, (m - 1) // 2, m // 2, BITS, BLOCK, False)
            x = _key_values(keys, IS_F64)
            median = (_key_values(lower_key, IS_F64).to(tl.float64) + _key_values(upper_key, IS_F64).to(tl.float64)) / 2
            wide = x.to(tl.float64)
            # |x - median| rounds as the CPU kernel's median - x and x - median do; abs also turns
            # a -0.0 distance (median -0.0, x +0.0) into +0.0, whose bits order correctly.
            distance = tl.abs(wide - median[None, :])
            # Non-negative doubles order as their bits; padding (NaN) gets the largest key.
            distance_bits = distance.to(tl.uint64, bitcast=True)
            distance_keys = tl.where(distance == distance, distance_bits, _all_ones_like(distance_bits, 64))
            reach_key, _ = _two_kth_keys(distance_keys, keep - 1, keep - 1, 64, BLOCK, True)
            reach = reach_key.to(tl.float64, bitcast=True)[None, :]
            nearer = distance < reach  # padding's NaN distance is neither
            at_reach = distance == reach
            tie_below = at_reach & (wide <= median[None, :])
            tie_above = at_reach & (wide > median[None, :])
            count_nearer = tl.sum(nearer.to(tl.int32), axis=0)
            take_below = tl.minimum(tl.sum(tie_below.to(tl.int32), axis=0), keep - count_nearer)
            take_above = keep - count_nearer - take_below
            # Within a tie group, the value nearest the median (they are one value unless float64
            # rounding merged neighbours far from the median).
            below_value = tl.max(tl.where(tie_below, wide, -float("inf")), axis=0)
            above_value = tl.min(tl.where(tie_above, wide, float("inf")), axis=0)
            total = tl.sum(tl.where(nearer, wide, 0.0), axis=0)
            # (An empty group's +-inf is replaced before the product, which would be 0 * inf.)
            total += take_below.to(tl.float64) * tl.where(take_below > 0, below_value, 0.0)
            total += take_above.to(tl.float64) * tl.where(take_above > 0, above_value, 0.0)
            tl.store(vector_ptr + cols, (total / keep.to(tl.float64)).to(x.dtype), mask=col_ok)
            # The kept window's ends; values equal to an end count as kept (as on CPU).
            nearest_low = tl.min(tl.where(nearer, wide, float("inf")), axis=0)
            nearest_high = tl.max(tl.where(nearer, wide, -float("inf")), axis=0)
            window_low = tl.where(take_below > 0, below_value, tl.where(count_nearer > 0, nearest_low, above_value))
            window_high = tl.where(take_above > 0, above_value, tl.where(count_nearer > 0, nearest_high, below_value))
            outside = (wide < window_low[None, :]) | (wide > window_high[None, :])
            _add_per_row(outside_ptr, pid, tl.sum(outside.to(tl.int32), axis=1), M_PAD)
            tile += programs
        tl.store(bad_ptr + pid, bad)


def _launch(kernel, programs: int, *args, **meta) -> None:
    """Launch ``kernel`` on ``programs`` programs; on any failure switch the kernels off."""
    global _failure
    try:
        kernel[(programs,)](*args, **meta)
    except Exception as exc:  # noqa: BLE001 - compiler and driver errors have no common type
        _failure = f"{type(exc).__name__}: {exc}"
        logging.getLogger(__name__).warning(
            "Triton selection kernel failed (%s); the coordinate-wise rules sort from now on", _failure
        )
        raise KernelUnavailable(_failure) from exc


def _launch_shape(updates: Tensor, m: int, block: int) -> tuple[int, int, int]:
    d = updates.shape[1]
    tiles = triton.cdiv(d, block)
    return tiles, _programs(updates.device, tiles), max(16, triton.next_power_of_2(m))


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
        _kept_mean_kernel, programs, updates, _rows_arg(updates, None), vector, outside, sq, bad,
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
        _closest_mean_kernel, programs, updates, _rows_arg(updates, rows), vector, outside, bad,
        m, d, updates.stride(0), updates.stride(1), keep, tiles, programs,
        HAS_ROWS=rows is not None, IS_F64=is_f64,
        BITS=64 if is_f64 else 32, M_PAD=m_pad, BLOCK=block or BLOCK_D, num_warps=num_warps or NUM_WARPS,
    )
    if bool(bad.any()):
        return None
    return outside.sum(dim=0, dtype=torch.int64)[:m]
