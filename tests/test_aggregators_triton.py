"""The Triton selection kernels give the CPU kernels' results.

On a GPU the rules run on CUDA tensors and take the compiled kernels; without one, conftest sets
``TRITON_INTERPRET=1`` and the same kernels run in Triton's interpreter on CPU tensors (inside
``portable_kernels()``, ``interpreted_on_cpu()``). Either way the reference is the numpy kernel
on the same stack.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import aggregators  # noqa: E402
from aggregators import order_stats_triton  # noqa: E402
from aggregators.blocks import portable_kernels  # noqa: E402

ON_GPU = torch.cuda.is_available()
RULES = ["median", "trimmed-mean", "meamed", "bulyan"]


def on_kernels(rule, x: torch.Tensor) -> aggregators.AggregationResult:
    """``rule(x)`` on the Triton kernels: compiled on CUDA, interpreted on CPU otherwise."""
    if ON_GPU:
        out = rule(x.cuda())
        return aggregators.AggregationResult(out.vector.cpu(), out.scores.cpu(), out.selected.cpu())
    with ExitStack() as stack:
        stack.enter_context(portable_kernels())
        stack.enter_context(order_stats_triton.interpreted_on_cpu())
        return rule(x)


def assert_same(kernel: aggregators.AggregationResult, reference: aggregators.AggregationResult) -> None:
    # Kept values are summed in float64 in another order: at most a rounding of the float64 sum.
    tol = 1e-6 if reference.vector.dtype == torch.float32 else 1e-12
    assert kernel.vector.dtype == reference.vector.dtype
    assert torch.allclose(kernel.vector, reference.vector, rtol=tol, atol=tol), (kernel.vector - reference.vector).abs().max()
    assert torch.allclose(kernel.scores, reference.scores, rtol=1e-9, atol=1e-12)
    assert torch.equal(kernel.selected, reference.selected)


def build(name: str, f: int):
    return aggregators.build(name) if name == "median" else aggregators.build(name, num_byzantine=f)


def min_rows(name: str, f: int) -> int:
    return 4 * f + 3 if name == "bulyan" else 2 * f + 1


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_the_cpu_kernels_on_attacked_stacks(name: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(5)
    x = (1 + 0.01 * torch.randn(15, 300, generator=generator)).to(dtype)
    x[3] += 1e30  # an attacker far out: must not swallow the honest values
    x[7] = -x[7]
    x[:, ::4] = 0.25  # whole columns tied
    x[::2, 1::5] = -0.0  # signed zeros among equal values
    x[11] = x[12]  # duplicate rows
    assert_same(on_kernels(build(name, 3), x), build(name, 3)(x))


@settings(max_examples=20, derandomize=True, deadline=None)
@given(
    name=st.sampled_from(RULES),
    f=st.integers(0, 3),
    extra=st.integers(0, 6),
    d=st.integers(1, 140),
    levels=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_kernels_match_the_cpu_kernels_with_many_ties(name, f, extra, d, levels, seed, dtype) -> None:
    # Values from a handful of levels: every coordinate has ties at the selected ranks.
    n = min_rows(name, f) + extra
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(-levels, levels + 1, (n, d), generator=generator).to(dtype) / 4
    assert_same(on_kernels(build(name, f), x), build(name, f)(x))


def test_meamed_keeps_every_strictly_nearer_value() -> None:
    # As tests/test_aggregators_rules.py asks of the CPU kernels: 0, 1.5, 1.8 are kept.
    x = torch.tensor([[0.0], [0.0], [1.5], [1.8], [3.0]], dtype=torch.float64)
    out = on_kernels(aggregators.build("meamed", num_byzantine=2), x)
    assert out.vector.item() == pytest.approx(1.1)
    assert out.scores.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("name", RULES)
def test_signed_zeros_are_one_value(name: str) -> None:
    # Bit keys order -0.0 before +0.0; the rules must not: a median of -0.0 is at distance 0
    # from +0.0.
    column = torch.tensor([-0.0, -0.0, -0.0, 0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 2.0, 3.0], dtype=torch.float64)
    x = torch.stack([column, -column, column.flip(0)], dim=1)
    assert_same(on_kernels(build(name, 2), x), build(name, 2)(x))


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_are_refused_by_name(name: str, bad: float) -> None:
    x = torch.randn(11, 40)
    x[4, 17] = bad
    with pytest.raises(ValueError, match=rf"{name}: rows \[4\] contain NaN or Inf"):
        on_kernels(build(name, 2), x)


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "meamed"])
def test_the_rules_take_the_selection_kernels(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    for kernel in ("kept_mean", "closest_mean"):
        original = getattr(order_stats_triton, kernel)

        def counted(*args, original=original, **kwargs):
            calls.append(original)
            return original(*args, **kwargs)

        monkeypatch.setattr(order_stats_triton, kernel, counted)
    x = torch.randn(9, 50)
    on_kernels(build(name, 2), x)
    assert len(calls) == 1
    assert order_stats_triton.failure() is None  # ran, and did not fall back to sorting


@pytest.mark.parametrize("name", RULES)
def test_a_failing_kernel_costs_nothing_but_the_kernel(name, monkeypatch, caplog) -> None:
    # A tile width Triton refuses (not a power of two) stands for a broken install.
    monkeypatch.setattr(order_stats_triton, "_failure", None)  # restored after the test
    monkeypatch.setattr(order_stats_triton, "BLOCK_D", 3)
    x = torch.randn(11, 30)
    x[2] += 100.0
    with caplog.at_level("WARNING", logger="aggregators.order_stats_triton"):
        out = on_kernels(build(name, 2), x)
    assert_same(out, build(name, 2)(x))  # the same call answered, on the sorting path
    assert order_stats_triton.failure() is not None
    assert "sort from now on" in caplog.text
    assert not order_stats_triton.supports(x.cuda() if ON_GPU else x, 11)
    x[4, 3] = float("nan")  # the sorting path validates in full
    with pytest.raises(ValueError, match=r"rows \[4\] contain NaN or Inf"):
        on_kernels(build(name, 2), x)


def test_more_rows_than_registers_take_the_sorting_path() -> None:
    n = order_stats_triton.MAX_ROWS + 1
    x = torch.randn(n, 3)
    assert not order_stats_triton.supports(x.cuda() if ON_GPU else x, n)
    assert_same(on_kernels(build("trimmed-mean", 10), x), build("trimmed-mean", 10)(x))


@pytest.mark.parametrize("name", RULES)
def test_views_are_read_through_their_strides(name: str) -> None:
    # A column slice (row stride > d) and a transposed stack (column stride n): no copy is made,
    # so the kernels must follow both strides.
    wide = torch.randn(11, 100)
    for view in (wide[:, 10:47], torch.randn(40, 11).T):
        assert_same(on_kernels(build(name, 2), view), build(name, 2)(view.contiguous()))


def test_every_kernel_variant_compiles_for_hopper() -> None:
    # The interpreter does not type-check like the compiler (a float64 bitcast bug passed it):
    # compile every variant the rules launch for sm_90 with Triton's bundled ptxas, no GPU needed.
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton has no bundled CUDA tools")
    root = Path(__file__).resolve().parents[1]
    config = f"{order_stats_triton.BLOCK_D}x{order_stats_triton.NUM_WARPS}"
    rows = f"16,{order_stats_triton.MAX_ROWS}"
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "triton_resources.py"), "--all-variants", "--rows", rows, "--configs", config],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.count("registers") == 16
