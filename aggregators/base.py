"""Shared types and input checks for every aggregation rule.

Every rule in :mod:`aggregators` is a small callable class: the constructor takes the rule's
parameters, ``rule(updates, weights=None)`` returns an :class:`AggregationResult`. This module holds
the result type, the input validation every rule runs first, and the exceptions' wording so that a
server log names the rule and the offending rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from aggregators.blocks import as_numpy, run_ranges, split_range, uses_numpy, worker_count

#: Default bound on the temporary memory a rule uses per chunk of columns (all worker threads
#: together). Small chunks stay in cache: at n=50, d=1e6 on this project's 2-core CPU the trimmed
#: mean took 0.078 s with 8 MiB against 0.109 s with 64 MiB and 0.129 s with 1 MiB (per-block
#: overhead), see the chunk-size rows of docs/benchmarks.md.
DEFAULT_MAX_CHUNK_BYTES: int = 8 * 1024 * 1024

#: Default bound on other devices (CUDA). There the chunked torch paths (Krum's Gram matrix,
#: distances, weighted sums) launch a few kernels per chunk, each costing ~10 us of Python and
#: launch overhead: at 8 MiB a (100, 11.2M) float32 stack is ~2,000 chunks, ~80 ms of overhead
#: against ~1.6 ms for one read of the stack on an H100. 256 MiB makes it ~70 chunks, and is
#: small next to the stack itself.
DEFAULT_MAX_CHUNK_BYTES_GPU: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class AggregationResult:
    """What a rule returns.

    Attributes
    ----------
    vector : Tensor
        The aggregate, shape ``(d,)``, same device and dtype as the input stack.
    scores : Tensor
        Shape ``(n,)``, float64, same device: higher means more suspicious. What the number means
        is rule-specific and documented on each rule (Krum score, distance to the output,
        fraction of coordinates trimmed, ...).
    selected : Tensor
        Shape ``(n,)``, bool, same device: rows that contributed to ``vector``.
    """

    vector: Tensor
    scores: Tensor
    selected: Tensor


def validate_updates(rule: str, updates: Tensor, check_finite: bool = True) -> None:
    """Reject anything a rule cannot aggregate, naming the rule and the problem.

    Parameters
    ----------
    rule : str
        Rule name, used in the error message.
    updates : Tensor
        Candidate ``(n, d)`` stack.
    check_finite : bool
        Scan the values for NaN/Inf. A rule whose kernel sees every value anyway may pass False,
        detect non-finite values itself, and then call this again with True for the error.

    Raises
    ------
    ValueError
        If ``updates`` is not a 2-D floating tensor with at least one row and one column, or if
        any row holds NaN or +-Inf (the message lists the bad row indices).
    """
    if not isinstance(updates, Tensor):
        raise ValueError(f"{rule}: updates must be a torch.Tensor, got {type(updates).__name__}")
    if updates.dim() != 2:
        raise ValueError(f"{rule}: updates must be 2-D (n, d), got shape {tuple(updates.shape)}")
    n, d = updates.shape
    if n < 1 or d < 1:
        raise ValueError(f"{rule}: updates must have n >= 1 rows and d >= 1 columns, got ({n}, {d})")
    if not updates.is_floating_point():
        raise ValueError(f"{rule}: updates must be floating point, got dtype {updates.dtype}")
    if not check_finite:
        return
    # Fast screen: a NaN or Inf anywhere in a row makes its plain sum non-finite (no false
    # negatives), and a plain sum is ~40x faster on CPU than isfinite(updates).all(dim=1). Rows
    # whose sum is non-finite (a NaN/Inf, or merely an overflow) get the exact per-element check.
    suspects = torch.nonzero(~torch.isfinite(row_sums(updates))).flatten()
    if suspects.numel() > 0:
        finite = torch.isfinite(updates[suspects]).all(dim=1)
        bad = suspects[~finite].tolist()
        if bad:
            raise ValueError(f"{rule}: rows {bad} contain NaN or Inf")


def raise_non_finite(rule: str, updates: Tensor) -> None:
    """Raise the ValueError naming the NaN/Inf rows, for a kernel that found some on its way."""
    validate_updates(rule, updates)
    raise ValueError(f"{rule}: updates contain NaN or Inf")


def row_sums(updates: Tensor) -> Tensor:
    """Plain per-row sums in the input dtype (the NaN/Inf screen), numpy threads on CPU."""
    if not uses_numpy(updates):
        return updates.sum(dim=1)
    x = as_numpy(updates)
    sums = np.empty(x.shape[0], dtype=x.dtype)

    def work(lo: int, hi: int) -> None:
        np.add.reduce(x[lo:hi], axis=1, out=sums[lo:hi])  # an overflow only makes a suspect

    run_ranges(work, split_range(x.shape[0], worker_count(x.size, x.shape[0])))
    return torch.from_numpy(sums)


def validate_weights(rule: str, weights: Optional[Tensor], updates: Tensor) -> Optional[Tensor]:
    """Check optional per-row weights and return them as float64 on the updates' device.

    Parameters
    ----------
    rule : str
        Rule name, used in the error message.
    weights : Tensor or None
        ``(n,)`` non-negative finite weights with a positive sum, or None.
    updates : Tensor
        The ``(n, d)`` stack the weights belong to.

    Returns
    -------
    Tensor or None
        The weights as float64 on ``updates.device`` (not normalised), or None.

    Raises
    ------
    ValueError
        On a wrong shape, a negative or non-finite weight, or an all-zero weight vector.
    """
    if weights is None:
        return None
    w = torch.as_tensor(weights).to(device=updates.device, dtype=torch.float64)
    n = updates.shape[0]
    if w.shape != (n,):
        raise ValueError(f"{rule}: weights must have shape ({n},), got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        bad = torch.nonzero(~torch.isfinite(w)).flatten().tolist()
        raise ValueError(f"{rule}: weights {bad} are NaN or Inf")
    if bool((w < 0).any()):
        bad = torch.nonzero(w < 0).flatten().tolist()
        raise ValueError(f"{rule}: weights {bad} are negative")
    if float(w.sum()) <= 0.0:
        raise ValueError(f"{rule}: weights sum to zero")
    return w


def check_num_byzantine(rule: str, num_byzantine: int) -> int:
    """Validate a constructor's ``num_byzantine`` (f) and return it as int."""
    if isinstance(num_byzantine, bool) or int(num_byzantine) != num_byzantine or num_byzantine < 0:
        raise ValueError(f"{rule}: num_byzantine must be a non-negative integer, got {num_byzantine!r}")
    return int(num_byzantine)


def impossible(rule: str, n: int, f: int, requirement: str) -> ValueError:
    """Build the error for parameters the rule cannot honour with n rows and f Byzantine ones."""
    return ValueError(f"{rule}: needs {requirement}, got n={n}, f={f}")


def column_chunks(n: int, d: int, bytes_per_value: int, max_chunk_bytes: int) -> Iterator[slice]:
    """Split ``range(d)`` into column slices whose ``(n, width)`` block fits ``max_chunk_bytes``.

    Parameters
    ----------
    n : int
        Number of rows.
    d : int
        Number of columns.
    bytes_per_value : int
        Bytes one temporary value takes (account for every temporary per element).
    max_chunk_bytes : int
        Upper bound on ``n * width * bytes_per_value``; at least one column per chunk.
    """
    width = max(1, int(max_chunk_bytes) // max(1, n * bytes_per_value))
    for start in range(0, d, width):
        yield slice(start, min(d, start + width))


def check_max_chunk_bytes(rule: str, max_chunk_bytes: Optional[int]) -> Optional[int]:
    """Validate the ``max_chunk_bytes`` constructor parameter (None: the device's default, see
    :func:`chunk_budget`)."""
    if max_chunk_bytes is None:
        return None
    if int(max_chunk_bytes) != max_chunk_bytes or max_chunk_bytes < 1:
        raise ValueError(f"{rule}: max_chunk_bytes must be a positive integer, got {max_chunk_bytes!r}")
    return int(max_chunk_bytes)


def chunk_budget(max_chunk_bytes: Optional[int], updates: object) -> int:
    """The chunk bound a rule uses on ``updates``: its own ``max_chunk_bytes``, or by default
    :data:`DEFAULT_MAX_CHUNK_BYTES` on CPU and :data:`DEFAULT_MAX_CHUNK_BYTES_GPU` elsewhere.

    ``updates`` may still be unvalidated (anything but a tensor gets the CPU default)."""
    if max_chunk_bytes is not None:
        return max_chunk_bytes
    device = getattr(updates, "device", None)
    return DEFAULT_MAX_CHUNK_BYTES if device is None or device.type == "cpu" else DEFAULT_MAX_CHUNK_BYTES_GPU
