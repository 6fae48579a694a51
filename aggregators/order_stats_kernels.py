"""The Triton kernels behind :mod:`aggregators.order_stats_triton` (see its docstring).

A module of its own so that importing :mod:`aggregators` does not import Triton (~0.2 s at every
start of a process that never aggregates on a GPU): :mod:`aggregators.order_stats_triton`
imports this on the first launch. Importing it needs Triton; with ``TRITON_INTERPRET=1`` set
before, the kernels are defined for Triton's interpreter.
"""

import triton
import triton.language as tl



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
def kept_mean_kernel(
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
def closest_mean_kernel(
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
