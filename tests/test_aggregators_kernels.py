"""The CPU kernels behind the rules: exact where the rules need it, independent of block size and
thread count, equal to the portable torch kernels that other devices run, and still finding
NaN/Inf rows now that the check rides on their passes."""

from __future__ import annotations

import os
import signal
import threading
import tracemalloc

import pytest
import torch

import aggregators
from aggregators.base import DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_CHUNK_BYTES_GPU, chunk_budget
from aggregators.blocks import portable_kernels, run_ranges, split_range
from aggregators.geometry import SKETCH_COLUMNS, pairwise_sq_distances

#: Wide enough for the checked Gram path and for two worker threads.
D = 8 * SKETCH_COLUMNS


def reference_sq_distances(x: torch.Tensor) -> torch.Tensor:
    x64 = x.to(torch.float64)
    return torch.cdist(x64, x64, compute_mode="donot_use_mm_for_euclid_dist").square()


def hard_stack(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stacks on which a Gram expansion goes wrong unless handled."""
    g = torch.Generator().manual_seed(seed)

    def noise(n: int, scale: float) -> torch.Tensor:
        return scale * torch.randn(n, D, generator=g, dtype=torch.float64)

    base = 1.0 + 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
    if kind == "near-identical":  # rows ~1 that differ by ~1e-3
        x = base + noise(12, 1e-3)
    elif kind == "colluders":  # an honest cluster and 4 identical attackers far away
        x = torch.cat([base + noise(12, 1e-2), (base + 10.0).expand(4, D)])
    elif kind == "near-colluders":  # attackers 1e-6 apart, 1e3 away from the honest rows
        x = torch.cat([base + noise(10, 1e-2), base + 1e3 + noise(5, 1e-6)])
    elif kind == "far-outlier":  # a 1e6 row drags the column mean
        x = base + noise(10, 1e-3)
        x[9] = 1e6
    elif kind == "offset":  # rows 1e3 from the origin, 1e-4 apart
        x = 1e3 + noise(12, 1e-4)
    elif kind == "hidden-attack":  # attackers differ only in columns the row-choosing sample skips
        x = base + noise(14, 1e-3)
        x[8:, 200:300] += 10.0
    elif kind == "line":  # rows along a line: clusters of every size
        x = base + torch.linspace(0, 1, 16, dtype=torch.float64)[:, None] * noise(1, 1.0) + noise(16, 1e-3)
    elif kind == "duplicates":  # most rows identical, a few others
        x = torch.cat([base.expand(9, D), base + noise(3, 1e-3)])
    elif kind == "tiny":  # float32 squares underflow
        x = noise(10, 1e-25)
    elif kind == "huge":  # float32 squares overflow
        x = noise(8, 1e20)
    else:
        raise AssertionError(kind)
    return x.to(dtype)


HARD_KINDS = ["near-identical", "colluders", "near-colluders", "far-outlier", "offset", "hidden-attack", "line", "duplicates", "tiny", "huge"]


@pytest.mark.parametrize("kind", HARD_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_stack_distances_within_1e5_of_float64(kind: str, dtype: torch.dtype) -> None:
    x = hard_stack(kind, dtype=dtype)
    ref = reference_sq_distances(x)
    ours = pairwise_sq_distances(x)
    n = x.shape[0]
    assert torch.equal(ours, ours.T) and bool((ours.diagonal() == 0).all())
    off = ~torch.eye(n, dtype=torch.bool)
    same = off & (ref == 0)
    assert bool((ours[same] == 0).all())  # identical rows: exactly 0
    apart = off & (ref > 0)
    assert ((ours - ref).abs()[apart] / ref[apart]).max().item() <= 1e-5


def test_the_hard_stacks_defeat_the_plain_float32_expansion() -> None:
    # The check above is not vacuous: the same input defeats the plain float32 expansion.
    x = hard_stack("near-identical")
    ref = reference_sq_distances(x)
    sq = (x * x).sum(dim=1)
    naive = (sq[:, None] + sq[None, :] - 2 * x @ x.T).to(torch.float64)
    off = ~torch.eye(x.shape[0], dtype=torch.bool)
    assert ((naive - ref).abs()[off] / ref[off]).max().item() > 1e-2


class threads:
    """Run a block with ``torch.get_num_threads() == count`` (the kernels' worker cap)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.count)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.previous)


def test_gram_distances_do_not_depend_on_block_size_or_threads() -> None:
    x = hard_stack("colluders")
    results = []
    for count, chunk in ((1, 1 << 16), (2, 8 << 20), (2, 1 << 30)):
        with threads(count):
            results.append(pairwise_sq_distances(x, max_chunk_bytes=chunk))
    for other in results[1:]:
        assert torch.allclose(other, results[0], rtol=1e-12, atol=0)


def attacked_stack(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Honest rows ~1, two attackers (+50 and a 1e30 coordinate), and tied columns."""
    g = torch.Generator().manual_seed(seed)
    x = 1.0 + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)
    x[-1] += 50.0
    x[-2, 5] = 1e30
    x[:, :40] = 0.0  # every value tied
    x[: n // 2, 40:80] = 0.5  # ties straddling the trimming thresholds
    return x.to(dtype)


RULES = ["mean", "median", "trimmed-mean", "meamed", "krum", "multi-krum", "bulyan"]
COORDINATE_WISE = {"median", "trimmed-mean", "meamed"}


def build(name: str) -> object:
    return aggregators.build(name) if name in ("mean", "median") else aggregators.build(name, num_byzantine=2)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [11, 12])
def test_numpy_kernels_match_the_portable_torch_kernels(name: str, dtype: torch.dtype, n: int) -> None:
    x = attacked_stack(n, D, dtype)
    ours = build(name)(x)
    with portable_kernels():
        portable = build(name)(x)
    assert ours.vector.dtype == dtype and ours.scores.dtype == torch.float64
    # Same kept values per coordinate, float64 sums in another order: within one final rounding.
    one_ulp = 2.0**-23 if dtype == torch.float32 else 1e-12
    assert torch.allclose(ours.vector, portable.vector, rtol=one_ulp if name in COORDINATE_WISE else 1e-6, atol=0)
    assert torch.allclose(ours.scores, portable.scores, rtol=1e-9, atol=0)
    assert torch.equal(ours.selected, portable.selected)


@pytest.mark.parametrize("name", RULES)
def test_results_do_not_depend_on_the_thread_count(name: str) -> None:
    x = attacked_stack(20, 2 * D, torch.float32)  # 655k values: two workers when allowed
    with threads(1):
        one = build(name)(x)
    with threads(2):
        two = build(name)(x)
    assert torch.allclose(one.vector, two.vector, rtol=1e-6, atol=0)
    if name in COORDINATE_WISE:
        assert torch.equal(one.vector, two.vector)
    assert torch.allclose(one.scores, two.scores, rtol=1e-12, atol=0)
    assert torch.equal(one.selected, two.selected)


@pytest.mark.parametrize("name", ["mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_kernels_that_check_on_the_way_still_name_the_bad_rows(name: str, bad: float) -> None:
    x = attacked_stack(11, D, torch.float32)
    x[3, -1] = bad  # the last column: the last block of the last worker
    x[7, D // 2] = bad
    with threads(2), pytest.raises(ValueError, match=rf"{name}: rows \[3, 7\] contain NaN or Inf"):
        build(name)(x)


def test_kernels_leave_the_input_alone_and_accept_views() -> None:
    wide = attacked_stack(11, D + 7, torch.float32)
    x = wide[:, 3 : D + 3]  # a strided view
    before = x.clone()
    for name in RULES:
        out = build(name)(x)
        assert torch.allclose(out.vector, build(name)(before).vector, rtol=1e-6, atol=0)
    assert torch.equal(x, before)


def test_split_range_covers_every_index_once_on_aligned_boundaries() -> None:
    for length, parts, align in [(10, 3, 1), (100, 4, 16), (5, 8, 1), (4096 * 3 + 5, 2, 4096), (1, 2, 4096)]:
        ranges = split_range(length, parts, align)
        assert 1 <= len(ranges) <= parts
        assert ranges[0][0] == 0 and ranges[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(lo < hi for lo, hi in ranges)
        assert all(lo % align == 0 for lo, _ in ranges)


def test_run_ranges_keeps_order_waits_for_all_and_reraises() -> None:
    with threads(4):
        assert run_ranges(lambda lo, hi: (lo, hi, threading.current_thread().name), [(0, 1), (1, 2), (2, 3)])[1][:2] == (1, 2)
        finished = []

        def work(lo: int, hi: int) -> None:
            if lo == 1:
                raise RuntimeError("range 1 failed")
            finished.append(lo)

        with pytest.raises(RuntimeError, match="range 1 failed"):
            run_ranges(work, [(0, 1), (1, 2), (2, 3)])
        assert sorted(finished) == [0, 2]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kernels_still_run_in_a_forked_child() -> None:
    # The parent's worker threads do not exist in a child; the kernels must not wait for them.
    x = attacked_stack(20, 2 * D, torch.float32)
    rule = build("trimmed-mean")
    with threads(2):
        expected = rule(x).vector
        pid = os.fork()
        if pid == 0:  # the child: exit 0 on the same answer; the alarm ends a hang
            signal.alarm(30)
            os._exit(0 if torch.equal(rule(x).vector, expected) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("name", RULES + ["geometric-median", "centered-clipping"])
def test_scratch_memory_stays_within_max_chunk_bytes(name: str) -> None:
    # numpy scratch is traced (torch's own allocations, e.g. the output, are not): the chunk
    # budget for all threads plus a few float64 d-vectors; a temporary as large as the 12 MB stack
    # would not fit.
    n, d, chunk = 30, 100_000, 1 << 20
    x = attacked_stack(n, d, torch.float32)
    rule = aggregators.build(name, max_chunk_bytes=chunk) if name in ("mean", "median", "geometric-median", "centered-clipping") else aggregators.build(name, num_byzantine=2, max_chunk_bytes=chunk)
    with threads(2):
        rule(x)  # warm-up: pool threads, lazily built helpers
        tracemalloc.start()
        try:
            rule(x)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak <= chunk + 4 * 8 * d + (1 << 20), f"{name}: {peak / 2**20:.1f} MiB of numpy scratch"


@pytest.mark.parametrize("name", RULES + ["geometric-median", "centered-clipping", "dnc", "signsgd-majority"])
def test_the_default_chunk_bound_follows_the_device(name: str) -> None:
    # CPU: cache-sized blocks; other devices: large chunks, since the torch paths pay a few kernel
    # launches per chunk. An explicit bound holds everywhere.
    cpu, meta = torch.empty(3, 4), torch.empty(3, 4, device="meta")
    params = {"num_byzantine": 1} if name in ("trimmed-mean", "meamed", "krum", "multi-krum", "bulyan", "dnc") else {}
    rule = aggregators.build(name, **params)
    assert chunk_budget(rule.max_chunk_bytes, cpu) == DEFAULT_MAX_CHUNK_BYTES
    assert chunk_budget(rule.max_chunk_bytes, meta) == DEFAULT_MAX_CHUNK_BYTES_GPU > DEFAULT_MAX_CHUNK_BYTES
    explicit = aggregators.build(name, max_chunk_bytes=4096, **params)
    assert chunk_budget(explicit.max_chunk_bytes, meta) == chunk_budget(explicit.max_chunk_bytes, cpu) == 4096
