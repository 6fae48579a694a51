"""Pre-aggregation steps (``clip``, ``arc``, ``nnm``, ``bucketing``) and the chain that runs them
before a rule.

A step is a callable ``step(updates, weights) -> (new_updates, mixing)`` with ``new_updates`` of
shape ``(m, d)`` and ``mixing`` of shape ``(m, n)`` (float64, non-negative) such that
``new_updates = mixing @ updates`` (up to rounding). The chain multiplies the mixing matrices so it
can map the rule's per-row ``scores`` / ``selected`` back to the n clients.

A step may also offer ``transform_sensitivity(clip_norm, n) -> (clip_norm', n')`` when it maps
replace-one neighbouring stacks of rows with norm <= clip_norm to replace-one neighbouring stacks of
n' rows with norm <= clip_norm'; the chain then offers ``sensitivity`` as the rule's sensitivity at
``(clip_norm', n')``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from aggregators.base import (
    AggregationResult,
    check_max_chunk_bytes,
    chunk_budget,
    check_num_byzantine,
    impossible,
    validate_updates,
    validate_weights,
)
from aggregators.geometry import mix_rows_into, pairwise_sq_distances, sq_norms
from aggregators.registry import register_pre

PreStep = Callable[[Tensor, Optional[Tensor]], Tuple[Tensor, Tensor]]


def mix_rows(updates: Tensor, mixing: Tensor, max_chunk_bytes: Optional[int] = None) -> Tensor:
    """``mixing @ updates`` accumulated in float64 per column chunk, returned in the input dtype."""
    out = torch.empty((mixing.shape[0], updates.shape[1]), dtype=updates.dtype, device=updates.device)
    return mix_rows_into(updates, mixing, out, max_chunk_bytes)


def _scale_rows(updates: Tensor, factors: Tensor) -> Tensor:
    """Rows multiplied by float64 ``factors``, in the input dtype."""
    return (updates * factors.to(updates.dtype)[:, None]).to(updates.dtype)


@register_pre("clip")
class Clip:
    """Clip every row to L2 norm <= ``norm`` (norms accumulated in float64).

    Mixing: diagonal, ``min(1, norm / ||x_i||)``.

    Parameters
    ----------
    norm : float
        Positive clipping threshold.
    """

    def __init__(self, norm: float = 1.0) -> None:
        if not (isinstance(norm, (int, float)) and math.isfinite(norm) and norm > 0):
            raise ValueError(f"clip: norm must be a positive finite number, got {norm!r}")
        self.norm = float(norm)

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        validate_updates("clip", updates)
        norms = sq_norms(updates).sqrt()
        factors = torch.where(norms > self.norm, self.norm / norms.clamp(min=1e-300), torch.ones_like(norms))
        # Rounding x * factor in the input dtype can overshoot the threshold by a few ulps; shrink
        # clipped rows by a few ulps of that dtype so ||clipped|| <= norm holds exactly (DP relies on it).
        slack = 4 * torch.finfo(updates.dtype).eps
        factors = torch.where(norms > self.norm, factors * (1 - slack), factors)
        return _scale_rows(updates, factors), torch.diag(factors)

    def transform_sensitivity(self, clip_norm: float, n: int) -> Tuple[float, int]:
        """Rows map one-to-one and end with norm <= min(clip_norm, norm)."""
        return min(float(clip_norm), self.norm), int(n)


@register_pre("arc")
class AdaptiveRobustClipping:
    """Adaptive Robust Clipping (Allouah et al., 2024): clip the k = floor(2 (f/n) (n - f))
    largest-norm rows to the norm of the (k+1)-th largest row.

    The threshold depends on all rows, so a replaced row changes every row's clipping: no
    sensitivity transform. Requires n > f (checked at call time).

    Parameters
    ----------
    num_byzantine : int
        f.
    """

    def __init__(self, num_byzantine: int = 0) -> None:
        self.num_byzantine = check_num_byzantine("arc", num_byzantine)

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        validate_updates("arc", updates)
        n = updates.shape[0]
        f = self.num_byzantine
        if n <= f:
            raise impossible("arc", n, f, "n > f")
        k = int(math.floor(2 * f * (n - f) / n))
        if k == 0:
            return updates.clone(), torch.eye(n, dtype=torch.float64, device=updates.device)
        norms = sq_norms(updates).sqrt()
        threshold = torch.topk(norms, k + 1).values[-1]
        factors = torch.where(norms > threshold, threshold / norms.clamp(min=1e-300), torch.ones_like(norms))
        return _scale_rows(updates, factors), torch.diag(factors)


@register_pre("nnm")
class NearestNeighborMixing:
    """Nearest Neighbor Mixing (Allouah et al., AISTATS 2023): replace every row by the average of
    its n - f nearest rows (itself included), using float64-exact distances.

    Requires n > f (checked at call time). Mixing: row i has ``1/(n - f)`` on its neighbours.

    Parameters
    ----------
    num_byzantine : int
        f.
    max_chunk_bytes : int or None
        Bound on float64 temporaries. None: 8 MiB on CPU, 256 MiB on
        other devices (:func:`aggregators.base.chunk_budget`).
    """

    def __init__(self, num_byzantine: int = 0, max_chunk_bytes: Optional[int] = None) -> None:
        self.num_byzantine = check_num_byzantine("nnm", num_byzantine)
        self.max_chunk_bytes = check_max_chunk_bytes("nnm", max_chunk_bytes)

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        validate_updates("nnm", updates)
        n = updates.shape[0]
        f = self.num_byzantine
        if n <= f:
            raise impossible("nnm", n, f, "n > f")
        sq_dist = pairwise_sq_distances(updates, budget)
        # A row is its own nearest neighbour (distance 0) even when another row ties at 0.
        sq_dist.fill_diagonal_(-1.0)
        neighbours = torch.topk(sq_dist, n - f, dim=1, largest=False).indices
        mixing = torch.zeros((n, n), dtype=torch.float64, device=updates.device)
        mixing.scatter_(1, neighbours, 1.0 / (n - f))
        return mix_rows(updates, mixing, budget), mixing


@register_pre("bucketing")
class Bucketing:
    """Bucketing (Karimireddy, He & Jaggi, ICLR 2022): shuffle the rows with a seeded generator,
    split them into buckets of ``size`` consecutive rows, average each bucket.

    Gives ceil(n / size) rows. The generator advances on every call (a new shuffle each round)
    and its state is saved by ``state_dict``. Mixing: ``1/|bucket|`` on the bucket's rows.

    Parameters
    ----------
    size : int
        Rows per bucket (the last bucket may be smaller).
    seed : int
        Seed of the shuffling generator.
    max_chunk_bytes : int or None
        Bound on float64 temporaries. None: 8 MiB on CPU, 256 MiB on
        other devices (:func:`aggregators.base.chunk_budget`).
    """

    def __init__(self, size: int = 2, seed: int = 0, max_chunk_bytes: Optional[int] = None) -> None:
        if isinstance(size, bool) or int(size) != size or size < 1:
            raise ValueError(f"bucketing: size must be a positive integer, got {size!r}")
        self.size = int(size)
        self.seed = int(seed)
        self.max_chunk_bytes = check_max_chunk_bytes("bucketing", max_chunk_bytes)
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        validate_updates("bucketing", updates)
        n = updates.shape[0]
        order = torch.randperm(n, generator=self.generator).to(updates.device)
        m = -(-n // self.size)
        mixing = torch.zeros((m, n), dtype=torch.float64, device=updates.device)
        for bucket, members in enumerate(torch.split(order, self.size)):
            mixing[bucket, members] = 1.0 / members.numel()
        return mix_rows(updates, mixing, budget), mixing

    def transform_sensitivity(self, clip_norm: float, n: int) -> Tuple[float, int]:
        """The shuffle does not depend on the data, so a replaced row changes exactly one bucket
        average, and averages of rows with norm <= C have norm <= C: ceil(n/size) rows."""
        return float(clip_norm), -(-int(n) // self.size)

    def state_dict(self) -> Dict[str, Any]:
        """The shuffling generator's state (a CPU uint8 tensor)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the generator state saved by :meth:`state_dict`."""
        self.generator.set_state(state["generator"])


def _label(step: Any) -> str:
    return str(getattr(step, "name", type(step).__name__))


def _uses_client_ids(part: Any) -> bool:
    return bool(getattr(part, "uses_client_ids", False))


#: Per-row client ids through a chain: an id, or the names of the steps that mixed the row's
#: clients (a string) once it holds more than one client.
RowIds = List[Any]


def _check_ids(label: str, client_ids: Optional[Sequence[int]], n: int) -> Optional[RowIds]:
    if client_ids is None:
        return None
    ids = client_ids.tolist() if isinstance(client_ids, Tensor) else list(client_ids)
    if len(ids) != n:
        raise ValueError(f"{label}: got {len(ids)} client_ids for {n} rows")
    return ids


def _mixed_ids(row_ids: RowIds, mixing: Tensor, step: str) -> RowIds:
    """The ids of a step's output rows: the one client a row is made from, else the step's name
    (a row already mixed by an earlier step keeps that step's name)."""
    sources = mixing != 0
    single = (sources.sum(dim=1) == 1).tolist()
    first = sources.to(torch.float64).argmax(dim=1).tolist()
    return [row_ids[j] if one else step for one, j in zip(single, first)]


def _ids_for(part: Any, row_ids: Optional[RowIds]) -> Optional[List[int]]:
    if row_ids is None:
        return None
    mixed = sorted({r for r in row_ids if isinstance(r, str)})
    if mixed:
        raise ValueError(
            f"{_label(part)}: needs one client per row, but step {mixed[0]!r} mixed several clients into one row; "
            f"put {_label(part)!r} before it in the chain"
        )
    return list(row_ids)


class PreAggregatedRule:
    """A rule preceded by pre-aggregation steps; built by ``build(name, pre=[...])``.

    ``rule(updates, weights)`` runs the steps in order (weights of mixed rows: the sum of the
    weights of the rows they mix), then the rule, and maps the rule's per-row outputs back to the
    n input rows through the product of the mixing matrices: a client's score is the
    mixing-weighted mean of the scores of the rows it contributes to; it is selected if it
    contributes to any selected row.

    Capabilities: ``needs_trusted_update``/``set_trusted_update``, ``uses_weights`` and
    ``sensitivity`` (only when every step offers ``transform_sensitivity``) follow the rule;
    ``state_dict``/``load_state_dict`` cover the rule and the stateful steps.

    Client identities: when the rule or a step has ``uses_client_ids`` (FoolsGold keys its history
    by client), so does the chain, and ``rule(updates, weights, client_ids=ids)`` passes each part
    the ids of the rows it receives: a row made from exactly one client's row keeps that client's
    id (clipping, FLAME's filter, FoolsGold's reweighting). A part that needs ids after a step has
    mixed several clients into one row (``nnm``, ``bucketing``) raises ValueError. Without
    ``client_ids`` the parts get None (their own fallback). Parts without ``uses_client_ids`` are
    called exactly as before.
    """

    def __init__(self, rule: Any, steps: Sequence[PreStep]) -> None:
        self.rule = rule
        self.steps: List[PreStep] = list(steps)
        self.name = "+".join([_label(step) for step in self.steps] + [_label(rule)])
        self.uses_weights = bool(getattr(rule, "uses_weights", False))
        if hasattr(rule, "set_trusted_update"):
            self.needs_trusted_update = bool(getattr(rule, "needs_trusted_update", False))
            self.set_trusted_update = rule.set_trusted_update
        if hasattr(rule, "sensitivity") and all(hasattr(step, "transform_sensitivity") for step in self.steps):
            self.sensitivity = self._sensitivity
        self.uses_client_ids = any(_uses_client_ids(part) for part in [*self.steps, rule])

    def _sensitivity(self, clip_norm: float, n: int) -> float:
        """The rule's sensitivity on the rows the steps produce (see the module docstring)."""
        for step in self.steps:
            clip_norm, n = step.transform_sensitivity(clip_norm, n)  # type: ignore[attr-defined]
        return float(self.rule.sensitivity(clip_norm, n))

    def __call__(
        self, updates: Tensor, weights: Optional[Tensor] = None, client_ids: Optional[Sequence[int]] = None
    ) -> AggregationResult:
        validate_updates(self.name, updates)
        current_weights = validate_weights(self.name, weights, updates)
        n = updates.shape[0]
        row_ids = _check_ids(self.name, client_ids, n)
        total = torch.eye(n, dtype=torch.float64, device=updates.device)
        current = updates
        for step in self.steps:
            rows = current.shape[0]
            if _uses_client_ids(step):
                current, mixing = step(current, current_weights, client_ids=_ids_for(step, row_ids))
            else:
                current, mixing = step(current, current_weights)
            mixing = torch.as_tensor(mixing).to(device=updates.device, dtype=torch.float64)
            if mixing.shape != (current.shape[0], rows):
                raise ValueError(
                    f"{_label(step)}: mixing matrix has shape {tuple(mixing.shape)}, "
                    f"expected ({current.shape[0]}, {rows})"
                )
            total = mixing @ total
            if current_weights is not None:
                current_weights = (mixing != 0).to(torch.float64) @ current_weights
            if row_ids is not None:
                row_ids = _mixed_ids(row_ids, mixing, _label(step))
        if _uses_client_ids(self.rule):
            result = self.rule(current, weights=current_weights, client_ids=_ids_for(self.rule, row_ids))
        else:
            result = self.rule(current, weights=current_weights)
        share = total.abs()  # (m, n): client j's share in row i
        contributes = share > 0
        mass = share.sum(dim=0)
        row_scores = result.scores.to(device=updates.device, dtype=torch.float64)
        scores = (share * row_scores[:, None]).sum(dim=0) / mass.clamp(min=1e-300)
        # A client no row draws on (cannot happen with the built-in steps) is maximally suspect.
        scores = torch.where(mass > 0, scores, row_scores.max())
        selected = (contributes & result.selected.to(updates.device)[:, None]).any(dim=0)
        return AggregationResult(result.vector, scores, selected)

    def state_dict(self) -> Dict[str, Any]:
        """State of the rule and of every stateful step (empty dicts for stateless ones)."""
        def state_of(part: Any) -> Dict[str, Any]:
            return part.state_dict() if hasattr(part, "state_dict") else {}

        return {"rule": state_of(self.rule), "pre": [state_of(step) for step in self.steps]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if hasattr(self.rule, "load_state_dict"):
            self.rule.load_state_dict(state.get("rule", {}))
        for step, step_state in zip(self.steps, state.get("pre", [])):
            if hasattr(step, "load_state_dict") and step_state:
                step.load_state_dict(step_state)
