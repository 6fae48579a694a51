"""Distances are float64-exact on input where float32 |x|^2 + |y|^2 - 2x.y cancels (rows ~1,
differences ~1e-3): the case where Flower's Krum picks the wrong client."""

from __future__ import annotations

import torch

import aggregators
from aggregators.geometry import pairwise_sq_distances, sq_norms


def near_identical_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = 1.0 + 0.1 * torch.randn(d, generator=g)
    return (base + 1e-3 * torch.randn(n, d, generator=g)).to(torch.float32)


def reference_sq_distances(x: torch.Tensor) -> torch.Tensor:
    x64 = x.to(torch.float64)
    return torch.cdist(x64, x64, compute_mode="donot_use_mm_for_euclid_dist").square()


def test_pairwise_distances_relative_error_below_1e5() -> None:
    x = near_identical_rows(12, 200_000)
    ref = reference_sq_distances(x)
    ours = pairwise_sq_distances(x, max_chunk_bytes=4 * 1024 * 1024)  # several column blocks
    off = ~torch.eye(12, dtype=torch.bool)
    rel = ((ours - ref).abs()[off] / ref[off]).max().item()
    assert rel <= 1e-5
    # The input is hard: the float32 Gram expansion on the raw rows is far worse.
    sq = (x * x).sum(dim=1)
    naive = (sq[:, None] + sq[None, :] - 2 * x @ x.T).to(torch.float64)
    naive_rel = ((naive - ref).abs()[off] / ref[off]).max().item()
    assert naive_rel > 100 * rel


def test_distances_exact_with_a_far_outlier_dragging_the_mean() -> None:
    # A 1e6-scale attacker moves the column mean, so centring on the mean cancels for the honest
    # pairs; the recentring / direct recomputation must still get them right.
    x = near_identical_rows(10, 50_000, seed=1)
    x[9] = 1e6
    ref = reference_sq_distances(x)
    ours = pairwise_sq_distances(x)
    off = ~torch.eye(10, dtype=torch.bool)
    assert ((ours - ref).abs()[off] / ref[off]).max().item() <= 1e-5


def test_krum_picks_the_float64_reference_choice() -> None:
    n, f = 9, 2
    x = near_identical_rows(n, 100_000, seed=2)
    ref = reference_sq_distances(x)
    ref.fill_diagonal_(float("inf"))
    ref_scores = ref.topk(n - f - 2, dim=1, largest=False).values.sum(dim=1)
    out = aggregators.build("krum", num_byzantine=f)(x)
    assert int(out.selected.nonzero()) == int(ref_scores.argmin())
    assert torch.allclose(out.scores, ref_scores, rtol=1e-5, atol=0)


def test_row_norms_accumulate_in_float64() -> None:
    x = near_identical_rows(3, 300_000, seed=3)
    ref = x.to(torch.float64).square().sum(dim=1)
    assert torch.allclose(sq_norms(x, max_chunk_bytes=1 << 20), ref, rtol=1e-12, atol=0)
