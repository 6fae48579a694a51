"""Properties every robust rule should have, checked with hypothesis on random stacks.

Stacks come from a torch generator seeded by hypothesis: continuous values, so the only exact ties
are structural ones (two mutual nearest neighbours have the same one-neighbour Krum score), which
the rules must break without looking at row order.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aggregators

FAST = settings(
    # Fixed examples in CI (no flaky runs); raise PHALANX_HYPOTHESIS_EXAMPLES to explore more.
    max_examples=int(os.environ.get("PHALANX_HYPOTHESIS_EXAMPLES", 25)),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

#: Rules whose output does not depend on the order of the rows.
PERMUTATION_INVARIANT = [
    "mean", "median", "trimmed-mean", "meamed", "krum", "multi-krum", "bulyan",
    "geometric-median", "centered-clipping", "dnc", "signsgd-majority", "fltrust",
]
#: Rules with rule(x + t) = rule(x) + t (centered-clipping starts at a fixed centre, sign vote
#: and FLTrust look at directions from the origin: not equivariant by design).
TRANSLATION_EQUIVARIANT = ["mean", "median", "trimmed-mean", "meamed", "krum", "multi-krum", "bulyan", "geometric-median", "dnc"]


def random_stack(seed: int, n: int, d: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)


def build_ready(name: str, f: int, trusted: torch.Tensor | None = None):
    rule = aggregators.build(name, num_byzantine=f)
    if getattr(rule, "needs_trusted_update", False):
        rule.set_trusted_update(trusted)
    return rule


def smallest_n(name: str, f: int) -> int:
    return {"krum": 2 * f + 3, "multi-krum": 2 * f + 3, "bulyan": 4 * f + 3}.get(name, 2 * f + 1)


@FAST
@given(
    name=st.sampled_from(PERMUTATION_INVARIANT),
    f=st.integers(0, 2),
    extra=st.integers(0, 4),
    d=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_permutation_invariance(name: str, f: int, extra: int, d: int, seed: int, dtype: torch.dtype) -> None:
    n = smallest_n(name, f) + extra
    x = random_stack(seed, n, d, dtype)
    trusted = random_stack(seed + 1, 1, d, dtype)[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = build_ready(name, f, trusted)(x)
    shuffled = build_ready(name, f, trusted)(x[perm])
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    assert torch.allclose(shuffled.vector, out.vector, rtol=tol, atol=tol)
    assert torch.allclose(shuffled.scores, out.scores[perm], rtol=1e-6, atol=1e-9)
    assert torch.equal(shuffled.selected, out.selected[perm])


@FAST
@given(
    name=st.sampled_from(TRANSLATION_EQUIVARIANT),
    f=st.integers(0, 2),
    extra=st.integers(0, 4),
    d=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    shift=st.floats(-100.0, 100.0),
)
def test_translation_equivariance(name: str, f: int, extra: int, d: int, seed: int, shift: float) -> None:
    n = smallest_n(name, f) + extra
    x = random_stack(seed, n, d)
    t = shift * random_stack(seed + 1, 1, d)[0]
    moved = build_ready(name, f)(x + t).vector
    assert torch.allclose(moved, build_ready(name, f)(x).vector + t, rtol=1e-6, atol=1e-6)


@FAST
@given(
    name=st.sampled_from(["median", "trimmed-mean"]),
    f=st.integers(1, 3),
    extra=st.integers(0, 4),
    d=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
    attack=st.lists(st.floats(-1e30, 1e30, allow_nan=False), min_size=1, max_size=10),
)
def test_output_within_honest_coordinate_range(name: str, f: int, extra: int, d: int, seed: int, attack: list[float]) -> None:
    n = 2 * f + 1 + extra
    honest = random_stack(seed, n - f, d)
    values = torch.tensor(attack, dtype=torch.float64)
    byzantine = values[torch.arange(f * d) % len(values)].reshape(f, d)
    out = aggregators.build(name, num_byzantine=f)(torch.cat([byzantine, honest]))
    assert bool((out.vector >= honest.min(dim=0).values).all())
    assert bool((out.vector <= honest.max(dim=0).values).all())


@FAST
@given(
    name=st.sampled_from(["krum", "multi-krum"]),
    f=st.integers(1, 3),
    extra=st.integers(0, 4),
    d=st.integers(2, 20),
    seed=st.integers(0, 2**31 - 1),
    distance=st.floats(50.0, 1e12),
    colluding=st.booleans(),
)
def test_krum_never_selects_a_far_outlier(name: str, f: int, extra: int, d: int, seed: int, distance: float, colluding: bool) -> None:
    n = 2 * f + 3 + extra
    centre = 5.0 * random_stack(seed, 1, d)
    honest = centre + 0.1 * random_stack(seed + 1, n - f, d)
    directions = random_stack(seed + 2, 1 if colluding else f, d)
    directions = directions / directions.norm(dim=1, keepdim=True)
    byzantine = (centre + distance * directions).expand(f, d)  # colluders share one point
    out = aggregators.build(name, num_byzantine=f)(torch.cat([honest, byzantine]).to(torch.float32))
    assert not bool(out.selected[n - f :].any())
    assert bool((out.scores[n - f :] > out.scores[: n - f].max()).all())


@FAST
@given(n=st.integers(1, 12), d=st.integers(1, 10), seed=st.integers(0, 2**31 - 1), spread=st.floats(1e-3, 1e3))
def test_geometric_median_objective_not_above_best_row(n: int, d: int, seed: int, spread: float) -> None:
    x = spread * random_stack(seed, n, d)
    out = aggregators.build("geometric-median")(x)
    objective = (x - out.vector).norm(dim=1).sum()
    best_row = torch.cdist(x, x).sum(dim=1).min()
    assert float(objective) <= float(best_row) * (1 + 1e-9)


SENSITIVE_RULES = ["mean", "median", "trimmed-mean", "krum", "multi-krum", "geometric-median", "centered-clipping"]


@FAST
@given(
    name=st.sampled_from(SENSITIVE_RULES),
    f=st.integers(0, 2),
    extra=st.integers(0, 4),
    d=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    clip=st.floats(0.1, 10.0),
    row=st.integers(0, 100),
)
def test_sensitivity_bounds_replace_one_change(name: str, f: int, extra: int, d: int, seed: int, clip: float, row: int) -> None:
    n = smallest_n(name, f) + extra
    x = random_stack(seed, n, d)
    x = x * (clip / x.norm(dim=1, keepdim=True).clamp(min=clip))  # rows in the clip-ball
    neighbour = x.clone()
    replacement = random_stack(seed + 1, 1, d)[0]
    neighbour[row % n] = -clip * replacement / replacement.norm()  # a boundary point, far away
    rule = aggregators.build(name, num_byzantine=f)
    state = rule.state_dict() if hasattr(rule, "state_dict") else None
    first = rule(x).vector
    if state is not None:
        rule.load_state_dict(state)  # same starting centre for both neighbours
    second = rule(neighbour).vector
    assert float((first - second).norm()) <= rule.sensitivity(clip, n) * (1 + 1e-9) + 1e-12


def reference_bulyan(x: torch.Tensor, f: int) -> torch.Tensor:
    """Slow, loop-per-coordinate Bulyan straight from the paper, for comparison."""
    n, d = x.shape
    remaining = list(range(n))
    chosen = []
    for _ in range(n - 2 * f):
        best, best_key = None, None
        for i in remaining:
            dists = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in remaining if j != i)
            # Krum score; ties broken by the score with one more neighbour, then the total.
            k = max(1, len(remaining) - f - 2)
            key = (sum(dists[:k]), sum(dists[: k + 1]), sum(dists))
            if best_key is None or key < best_key:
                best, best_key = i, key
        chosen.append(best)
        remaining.remove(best)
    beta = n - 4 * f
    out = torch.empty(d, dtype=x.dtype)
    for j in range(d):
        values = sorted(float(x[i, j]) for i in chosen)
        m = len(values)
        median = values[m // 2] if m % 2 else (values[m // 2 - 1] + values[m // 2]) / 2
        closest = sorted(values, key=lambda v: abs(v - median))[:beta]
        out[j] = sum(closest) / beta
    return out


@settings(max_examples=15, derandomize=True, deadline=None)
@given(f=st.integers(0, 2), extra=st.integers(0, 3), d=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_bulyan_matches_a_direct_implementation(f: int, extra: int, d: int, seed: int) -> None:
    x = random_stack(seed, 4 * f + 3 + extra, d)
    assert torch.allclose(aggregators.build("bulyan", num_byzantine=f)(x).vector, reference_bulyan(x, f))


CHUNKED_RULES = [name for name in aggregators.available() if not name.startswith("test-")]


@pytest.mark.parametrize("name", CHUNKED_RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_equals_unchunked(name: str, dtype: torch.dtype) -> None:
    x = random_stack(11, 11, 500, dtype)
    x[10] += 50.0
    trusted = random_stack(12, 1, 500, dtype)[0]
    results = []
    for max_chunk_bytes in (2048, 1 << 30):
        rule = aggregators.build(name, num_byzantine=2, max_chunk_bytes=max_chunk_bytes)
        if getattr(rule, "needs_trusted_update", False):
            rule.set_trusted_update(trusted)
        results.append(rule(x))
    small, whole = results
    # Coordinate-wise rules are bit-identical; Gram/dot accumulations differ only in summation order.
    assert torch.allclose(small.vector, whole.vector, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-7)
    assert torch.allclose(small.scores, whole.scores, rtol=1e-9, atol=1e-12)
    assert torch.equal(small.selected, whole.selected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CHUNKED_RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(name: str, dtype: torch.dtype) -> None:
    x = random_stack(21, 11, 300, dtype)
    x[10] += 50.0
    trusted = random_stack(22, 1, 300, dtype)[0]
    outs = []
    for device in ("cpu", "cuda"):
        rule = aggregators.build(name, num_byzantine=2)
        if getattr(rule, "needs_trusted_update", False):
            rule.set_trusted_update(trusted.to(device))
        outs.append(rule(x.to(device)))
    cpu, gpu = outs
    assert gpu.vector.device.type == "cuda" and gpu.scores.device.type == "cuda" and gpu.selected.device.type == "cuda"
    assert gpu.vector.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.allclose(gpu.vector.cpu(), cpu.vector, rtol=tol, atol=tol)
    assert torch.allclose(gpu.scores.cpu(), cpu.scores, rtol=1e-6, atol=1e-9)
    assert torch.equal(gpu.selected.cpu(), cpu.selected)


@pytest.mark.parametrize("name", CHUNKED_RULES)
@pytest.mark.parametrize("d", [1, 7])
def test_rules_never_modify_their_input(name: str, d: int) -> None:
    # d = 1 matters: a transposed (n, 1) block is already contiguous, so a careless in-place
    # sort would reorder the caller's rows.
    x = random_stack(31, 9, d).to(torch.float32)
    before = x.clone()
    rule = aggregators.build(name, num_byzantine=1)
    if getattr(rule, "needs_trusted_update", False):
        rule.set_trusted_update(torch.ones(d))
    rule(x)
    assert torch.equal(x, before)
