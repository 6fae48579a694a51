"""FoolsGold (``foolsgold``): down-weight clients whose update history looks like another's.

Fung, Yoon & Beschastnikh, "The Limitations of Federated Learning in Sybil Settings", RAID 2020,
Algorithm 1. Sybils pursuing one goal send updates that point the same way round after round,
while honest clients' updates differ with their data. FoolsGold keeps, per client, the sum of all
its updates so far (its history ``H_i``) and each round:

1. ``cs_ij = cos(H_i, H_j)`` for the clients of the round, ``v_i = max_{j != i} cs_ij``;
2. pardoning: ``cs_ij *= v_i / v_j`` when ``v_j > v_i`` (an honest client that merely resembles a
   sybil is not punished for the sybil's similarity to others);
3. ``alpha_i = 1 - max_j cs_ij`` clipped to [0, 1], divided by its maximum, 1 replaced by 0.99;
4. ``alpha_i = kappa (ln(alpha_i / (1 - alpha_i)) + 0.5)`` clipped to [0, 1] (the logit spreads
   the weights away from 0.5; kappa = 1 in the paper).

The maximum of step 1 is floored at 0 (the reference implementation's ``cs - eye`` keeps a 0 on
the diagonal), so anti-correlated clients count as dissimilar, not as more than dissimilar.

History is keyed by client identity: clients are sampled, so the row of a client changes from
round to round. Rules and steps with ``uses_client_ids = True`` take ``client_ids`` (one int per
row, e.g. Flower node ids). Without them the row index is the identity, which is right only when
the same clients send their rows in the same order every round; mixing the two keyings in one
history raises ValueError.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from aggregators.base import (
    AggregationResult,
    check_max_chunk_bytes,
    chunk_budget,
    row_sums,
    validate_updates,
    validate_weights,
)
from aggregators.blocks import as_numpy, uses_numpy
from aggregators.geometry import weighted_mean_rows
from aggregators.registry import register, register_pre
from aggregators.similarity import cosine_similarities

#: ``keyed_by`` values of the history.
KEYED_BY_CLIENT_IDS = "client-ids"
KEYED_BY_ROW_INDEX = "row-index"


def check_client_ids(rule: str, client_ids: Optional[Sequence[int]], n: int) -> Optional[List[int]]:
    """Validate per-row client ids: ``n`` distinct integers (Python, numpy or a 1-D torch tensor).

    Returns the ids as a list of Python ints, or None when ``client_ids`` is None.
    """
    if client_ids is None:
        return None
    if isinstance(client_ids, Tensor):
        if client_ids.dim() != 1 or client_ids.is_floating_point() or client_ids.dtype == torch.bool:
            raise ValueError(f"{rule}: client_ids must be a 1-D integer tensor, got {client_ids.dtype} of shape {tuple(client_ids.shape)}")
        client_ids = client_ids.tolist()
    if isinstance(client_ids, (str, bytes)):
        raise ValueError(f"{rule}: client_ids must be a sequence of ints, got {type(client_ids).__name__}")
    ids: List[int] = []
    for value in client_ids:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise ValueError(f"{rule}: client_ids must be integers, got {value!r}")
        ids.append(int(value.__index__()))
    if len(ids) != n:
        raise ValueError(f"{rule}: got {len(ids)} client_ids for {n} rows")
    if len(set(ids)) != n:
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{rule}: client_ids {repeated} appear more than once")
    return ids


def foolsgold_weights(similarity: Tensor, kappa: float = 1.0) -> Tensor:
    """FoolsGold's contribution weights from the clients' pairwise history similarities.

    Parameters
    ----------
    similarity : Tensor
        ``(m, m)`` float64 cosine similarities of the clients' histories (diagonal ignored).
    kappa : float
        Confidence of the logit (step 4).

    Returns
    -------
    Tensor
        ``(m,)`` float64 weights in [0, 1]. All zero when every client's history points exactly like
        another's (nothing left to tell sybils from honest clients).
    """
    cs = similarity.clone()
    cs.fill_diagonal_(0.0)
    top = cs.max(dim=1).values
    # Pardoning: cs_ij * v_i / v_j where v_j > v_i (v_j > v_i >= 0, so no division by zero).
    pardon = top[None, :] > top[:, None]
    cs = torch.where(pardon, cs * top[:, None] / top[None, :].clamp(min=1e-300), cs)
    alpha = (1.0 - cs.max(dim=1).values).clamp(min=0.0, max=1.0)
    peak = alpha.max()
    if float(peak) == 0.0:
        return torch.zeros_like(alpha)
    alpha = alpha / peak
    alpha = torch.where(alpha == 1.0, torch.full_like(alpha, 0.99), alpha)
    positive = alpha > 0
    logit = kappa * (torch.log(alpha.clamp(min=1e-300) / (1.0 - alpha)) + 0.5)
    return torch.where(positive, logit, torch.zeros_like(alpha)).clamp(min=0.0, max=1.0)


def _add_histories(updates: Tensor, pasts: List[Optional[Tensor]]) -> Tensor:
    """``(n, d)`` stack of ``pasts[i] + updates[i]`` (``updates[i]`` where there is no past), in the
    updates' dtype and on their device; numpy on CPU (torch's element-wise CPU threads crawl on a
    loaded machine, see :mod:`aggregators.blocks`)."""
    stacked = torch.empty_like(updates, memory_format=torch.contiguous_format)
    if uses_numpy(updates):
        x, out = as_numpy(updates), as_numpy(stacked)
        for row, past in enumerate(pasts):
            if past is None:
                np.copyto(out[row], x[row])
            else:
                np.add(as_numpy(past.to(device="cpu", dtype=updates.dtype)), x[row], out=out[row])
        return stacked
    for row, past in enumerate(pasts):
        if past is None:
            stacked[row] = updates[row]
        else:
            torch.add(past.to(device=updates.device, dtype=updates.dtype), updates[row], out=stacked[row])
    return stacked


def _split_rows(stacked: Tensor) -> List[Tensor]:
    """The rows of ``stacked`` as separate tensors (own memory each)."""
    if uses_numpy(stacked):
        return [torch.from_numpy(row.copy()) for row in as_numpy(stacked)]
    return [row.clone() for row in stacked.unbind(0)]


class FoolsGoldHistory:
    """The per-client sums of updates and the weights they give (shared by rule and step).

    History tensors are never written in place (each round replaces them), so a ``state_dict``
    taken before a round stays valid after it without a copy.
    """

    def __init__(self, label: str, kappa: float, max_chunk_bytes: Optional[int]) -> None:
        if isinstance(kappa, bool) or not (isinstance(kappa, (int, float)) and math.isfinite(kappa) and kappa > 0):
            raise ValueError(f"{label}: kappa must be a positive finite number, got {kappa!r}")
        self.label = label
        self.kappa = float(kappa)
        self.max_chunk_bytes = check_max_chunk_bytes(label, max_chunk_bytes)
        self.history: Dict[int, Tensor] = {}
        self.keyed_by: Optional[str] = None

    def observe(self, updates: Tensor, client_ids: Optional[Sequence[int]], check: bool = True) -> Tensor:
        """Add this round's rows to their clients' histories and return the (n,) float64 weights.

        A history lives on the device and in the dtype of its client's latest update. Nothing is
        stored when the call raises (a rejected round leaves the history as it was). ``check=False``
        skips the input validation a caller has already done.
        """
        budget = chunk_budget(self.max_chunk_bytes, updates)
        if check:
            validate_updates(self.label, updates)
        n, d = updates.shape
        ids = check_client_ids(self.label, client_ids, n)
        keyed_by = KEYED_BY_ROW_INDEX if ids is None else KEYED_BY_CLIENT_IDS
        if self.keyed_by is not None and self.keyed_by != keyed_by and self.history:
            raise ValueError(
                f"{self.label}: history is keyed by {self.keyed_by} but this call is keyed by {keyed_by}; "
                "pass client_ids on every call or on none"
            )
        if ids is None:
            ids = list(range(n))
        pasts = []
        for client in ids:
            past = self.history.get(client)
            if past is not None and past.shape != (d,):
                raise ValueError(f"{self.label}: client {client} has a history of {past.shape[0]} values, this update has {d}")
            pasts.append(past)
        stacked = _add_histories(updates, pasts)
        suspects = torch.nonzero(~torch.isfinite(row_sums(stacked))).flatten().tolist()
        bad = [ids[row] for row in suspects if not bool(torch.isfinite(stacked[row]).all())]
        if bad:
            raise ValueError(f"{self.label}: the summed history of clients {bad} overflows")
        similarity, _ = cosine_similarities(stacked, budget)
        weights = foolsgold_weights(similarity, self.kappa)
        # One tensor per client (not views of ``stacked``): a replaced history frees its memory.
        self.history.update(zip(ids, _split_rows(stacked)))
        self.keyed_by = keyed_by
        return weights

    def state_dict(self) -> Dict[str, Any]:
        """``{"history": {client id: (d,) tensor}, "keyed_by": str or None}`` (tensors shared)."""
        return {"history": dict(self.history), "keyed_by": self.keyed_by}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (after a checkpoint, ids may be ints or strs)."""
        history = state.get("history", {})
        keyed_by = state.get("keyed_by")
        if keyed_by not in (None, KEYED_BY_CLIENT_IDS, KEYED_BY_ROW_INDEX):
            raise ValueError(f"{self.label}: keyed_by must be {KEYED_BY_CLIENT_IDS!r} or {KEYED_BY_ROW_INDEX!r}, got {keyed_by!r}")
        restored: Dict[int, Tensor] = {}
        for key, tensor in history.items():
            if not isinstance(tensor, Tensor) or tensor.dim() != 1 or not tensor.is_floating_point():
                raise ValueError(f"{self.label}: history of client {key!r} must be a 1-D floating tensor")
            restored[int(key)] = tensor
        self.history = restored
        self.keyed_by = keyed_by


@register("foolsgold")
class FoolsGold:
    """FoolsGold (Fung, Yoon & Beschastnikh, RAID 2020): the mean of the rows weighted by
    FoolsGold's contribution weights (module notes), which go to 0 for clients whose summed
    update history points like another client's.

    Stateful and keyed by client: call ``rule(updates, weights=None, client_ids=ids)`` with one
    distinct int per row (``uses_client_ids`` is True). Without ``client_ids`` a row's index is its
    identity (right only for the same clients in the same order every round); a history built one
    way refuses calls keyed the other way (ValueError).

    With ``weights`` (e.g. sample counts) the coefficient of row i is ``alpha_i * w_i``. When every
    coefficient is 0 (every client's history points exactly like another's), the output is the zero
    vector and no row is selected. A single row gets weight 1.

    Scores: ``1 - alpha_i`` in [0, 1]. ``selected``: rows with a positive coefficient.

    Parameters
    ----------
    kappa : float
        Confidence parameter of the logit, 1 in the paper.
    max_chunk_bytes : int or None
        Bound on float64 temporaries. None: 8 MiB on CPU, 256 MiB on other devices
        (:func:`aggregators.base.chunk_budget`).
    """

    uses_weights = True
    uses_client_ids = True

    def __init__(self, kappa: float = 1.0, max_chunk_bytes: Optional[int] = None) -> None:
        self.tracker = FoolsGoldHistory("foolsgold", kappa, max_chunk_bytes)
        self.kappa = self.tracker.kappa
        self.max_chunk_bytes = self.tracker.max_chunk_bytes

    def __call__(
        self, updates: Tensor, weights: Optional[Tensor] = None, client_ids: Optional[Sequence[int]] = None
    ) -> AggregationResult:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        validate_updates("foolsgold", updates)
        data_weights = validate_weights("foolsgold", weights, updates)
        alpha = self.tracker.observe(updates, client_ids, check=False)
        coeffs = alpha if data_weights is None else alpha * data_weights
        selected = coeffs > 0
        vector = torch.zeros(updates.shape[1], dtype=updates.dtype, device=updates.device)
        if bool(selected.any()):
            weighted_mean_rows(updates, coeffs / coeffs.sum(), vector, budget)
        return AggregationResult(vector, 1.0 - alpha, selected)

    def state_dict(self) -> Dict[str, Any]:
        """The per-client histories (see :meth:`FoolsGoldHistory.state_dict`)."""
        return self.tracker.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.tracker.load_state_dict(state)


@register_pre("foolsgold")
class FoolsGoldReweighting:
    """FoolsGold as a pre-aggregation step: each row scaled by its client's FoolsGold weight (the
    paper applies the weights as per-client learning rates), rows of weight 0 dropped.

    The next rule then aggregates ``alpha_i x_i``; e.g. ``mean`` gives ``sum_i alpha_i x_i / m``
    over the m rows kept. Keyed by client like :class:`FoolsGold`: a chain built with this step
    passes its ``client_ids`` here as long as every row still belongs to one client, so put this
    step before any step that mixes rows (``nnm``, ``bucketing``). Mixing: ``alpha_i`` at each kept
    row's column. Raises ValueError when every weight is 0 (after recording the round).

    Parameters
    ----------
    kappa : float
        Confidence parameter of the logit, 1 in the paper.
    max_chunk_bytes : int or None
        Bound on float64 temporaries. None: 8 MiB on CPU, 256 MiB on other devices.
    """

    uses_client_ids = True

    def __init__(self, kappa: float = 1.0, max_chunk_bytes: Optional[int] = None) -> None:
        self.tracker = FoolsGoldHistory("foolsgold", kappa, max_chunk_bytes)
        self.kappa = self.tracker.kappa

    def __call__(
        self, updates: Tensor, weights: Optional[Tensor] = None, client_ids: Optional[Sequence[int]] = None
    ) -> Tuple[Tensor, Tensor]:
        alpha = self.tracker.observe(updates, client_ids)
        rows = torch.nonzero(alpha > 0).flatten()
        if rows.numel() == 0:
            raise ValueError("foolsgold: every client's weight is 0 (each history points exactly like another's)")
        mixing = torch.zeros((rows.numel(), updates.shape[0]), dtype=torch.float64, device=updates.device)
        mixing[torch.arange(rows.numel(), device=updates.device), rows] = alpha[rows]
        scaled = (updates[rows] * alpha[rows].to(updates.dtype)[:, None]).to(updates.dtype)
        return scaled, mixing

    def state_dict(self) -> Dict[str, Any]:
        """The per-client histories (see :meth:`FoolsGoldHistory.state_dict`)."""
        return self.tracker.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.tracker.load_state_dict(state)
