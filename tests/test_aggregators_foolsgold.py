"""Specification of FoolsGold (aggregators/foolsgold.py): the rule ``foolsgold`` and the step.

Fung, Yoon & Beschastnikh, RAID 2020: clients whose summed update histories point alike (sybils)
get contribution weights near 0; history is kept per client id across rounds.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aggregators
from aggregators.foolsgold import FoolsGoldReweighting, foolsgold_weights

FAST = settings(
    max_examples=int(os.environ.get("PHALANX_HYPOTHESIS_EXAMPLES", 25)),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

HONEST_IDS = [101, 102, 103, 104, 105, 106, 107]
SYBIL_IDS = [901, 902, 903]


def sybil_round(g: torch.Generator, d: int = 300, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """7 diverse honest updates (each its own random direction plus a shared drift) and 3 sybils
    sending the same poisoned update with a little jitter."""
    shared = torch.zeros(d, dtype=torch.float64)
    shared[:10] = 0.3
    honest = shared + torch.randn(7, d, generator=g, dtype=torch.float64)
    target = torch.zeros(d, dtype=torch.float64)
    target[-1] = 5.0
    sybils = target + 0.05 * torch.randn(3, d, generator=g, dtype=torch.float64)
    return torch.cat([honest, sybils]).to(dtype)


def reference_foolsgold(histories: np.ndarray) -> np.ndarray:
    """The authors' reference (DistributedML/FoolsGold, foolsgold.py), transcribed with numpy loops."""
    n = histories.shape[0]
    unit = histories / np.linalg.norm(histories, axis=1, keepdims=True)
    cs = unit @ unit.T - np.eye(n)
    maxcs = np.max(cs, axis=1)
    for i in range(n):
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j]:
                cs[i][j] = cs[i][j] * maxcs[i] / maxcs[j]
    wv = 1 - np.max(cs, axis=1)
    wv[wv > 1] = 1
    wv[wv < 0] = 0
    wv = wv / np.max(wv)
    wv[wv == 1] = 0.99
    with np.errstate(divide="ignore"):
        wv = np.log(wv / (1 - wv)) + 0.5
    wv[np.isinf(wv) + wv > 1] = 1
    wv[wv < 0] = 0
    return wv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sybils_weight_goes_to_zero_and_honest_clients_keep_theirs(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    rule = aggregators.build("foolsgold")
    assert rule.uses_client_ids
    for _ in range(5):
        out = rule(sybil_round(g, dtype=dtype), client_ids=HONEST_IDS + SYBIL_IDS)
        weights = 1.0 - out.scores
        assert bool((weights[7:] < 1e-6).all()), weights
        assert bool((weights[:7] > 0.9).all()), weights
        assert out.selected.tolist() == [True] * 7 + [False] * 3
    # The aggregate is the mean of the honest rows: the sybils' coordinate gets nothing from them.
    assert out.vector.dtype == dtype


def test_history_is_keyed_by_client_not_by_row() -> None:
    # Round 1: two sybils and two honest clients. Round 2: the rows come shuffled, and the sybils
    # send updates that on their own look unrelated: their summed histories still point alike.
    rule = aggregators.build("foolsgold")
    e = torch.eye(6, dtype=torch.float64)
    first = torch.stack([e[0], e[1], 10 * e[5], 10 * e[5] + 0.1 * e[4]])
    rule(first, client_ids=[1, 2, 66, 77])
    second = torch.stack([e[2] * 0.5, e[3], e[0] + e[1], e[1] - e[0]])
    out = rule(second, client_ids=[66, 1, 77, 2])
    weights = dict(zip([66, 1, 77, 2], (1.0 - out.scores).tolist()))
    assert weights[66] < 0.05 and weights[77] < 0.05
    assert weights[1] == 1.0 and weights[2] == 1.0
    # The same second round keyed by row index (no history link to round 1) treats them alike.
    fresh = aggregators.build("foolsgold")
    assert bool(((1.0 - fresh(second).scores) > 0.9).all())


def test_history_survives_a_state_dict_round_trip_through_a_checkpoint() -> None:
    g = torch.Generator().manual_seed(1)
    stacks = [sybil_round(g) for _ in range(4)]
    ids = HONEST_IDS + SYBIL_IDS
    uninterrupted = aggregators.build("foolsgold")
    expected = [uninterrupted(x, client_ids=ids) for x in stacks]
    first = aggregators.build("foolsgold")
    for x in stacks[:2]:
        first(x, client_ids=ids)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = aggregators.build("foolsgold")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for x, want in zip(stacks[2:], expected[2:]):
        got = resumed(x, client_ids=ids)
        assert torch.equal(got.scores, want.scores) and torch.equal(got.vector, want.vector)


def test_state_dict_is_a_snapshot_the_server_can_rewind_to() -> None:
    # The strategy saves the rule's state before a round and reloads it to aggregate the round
    # again without excluded clients: the round must then count once.
    g = torch.Generator().manual_seed(2)
    x = sybil_round(g)
    ids = HONEST_IDS + SYBIL_IDS
    rule = aggregators.build("foolsgold")
    rule(x, client_ids=ids)
    before = rule.state_dict()
    once = aggregators.build("foolsgold")
    once.load_state_dict(before)
    rule(x, client_ids=ids)
    rule.load_state_dict(before)
    assert torch.equal(rule(x, client_ids=ids).scores, once(x, client_ids=ids).scores)


def test_weights_match_the_authors_reference() -> None:
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        h = torch.randn(8, 5, generator=g, dtype=torch.float64)
        h[5:] = h[5] + 0.1 * torch.randn(3, 5, generator=g, dtype=torch.float64) * (trial % 3)
        cosine = (h / h.norm(dim=1, keepdim=True)) @ (h / h.norm(dim=1, keepdim=True)).T
        ours = foolsgold_weights(cosine).numpy()
        np.testing.assert_allclose(ours, reference_foolsgold(h.numpy()), rtol=1e-12, atol=1e-12)


def test_data_weights_multiply_the_foolsgold_weights() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    out = aggregators.build("foolsgold")(x, weights=torch.tensor([1.0, 3.0, 0.0]))
    # Orthogonal / opposite rows: FoolsGold weight 1 each; data weights 1, 3, 0.
    assert torch.allclose(out.vector, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert out.selected.tolist() == [True, True, False] and out.scores.tolist() == [0.0, 0.0, 0.0]


def test_when_every_history_has_a_twin_nothing_is_aggregated() -> None:
    x = torch.tensor([[1.0, 2.0], [2.0, 4.0], [-3.0, 1.0], [-3.0, 1.0]])
    out = aggregators.build("foolsgold")(x)
    assert out.scores.tolist() == [1.0] * 4 and not bool(out.selected.any())
    assert torch.equal(out.vector, torch.zeros(2))
    with pytest.raises(ValueError, match="foolsgold: every client's weight is 0"):
        FoolsGoldReweighting()(x)


def test_one_row_gets_weight_one() -> None:
    out = aggregators.build("foolsgold")(torch.tensor([[3.0, -1.0]]), client_ids=[5])
    assert out.scores.tolist() == [0.0] and torch.equal(out.vector, torch.tensor([3.0, -1.0]))


def test_zero_updates_are_orthogonal_to_the_rest() -> None:
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert (1.0 - aggregators.build("foolsgold")(x).scores).tolist() == [1.0, 1.0, 1.0]


# --- client ids -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ids, message", [
    ([1, 2], r"got 2 client_ids for 3 rows"),
    ([1, 1, 2], r"client_ids \[1\] appear more than once"),
    ([1, 2.5, 3], r"client_ids must be integers, got 2.5"),
    ([1, True, 3], r"client_ids must be integers, got True"),
    ("abc", r"client_ids must be a sequence of ints"),
    (torch.tensor([1.0, 2.0, 3.0]), r"client_ids must be a 1-D integer tensor"),
])
def test_bad_client_ids_are_named(ids, message: str) -> None:
    with pytest.raises(ValueError, match=f"foolsgold: {message}"):
        aggregators.build("foolsgold")(torch.randn(3, 4), client_ids=ids)


def test_client_ids_may_be_numpy_or_torch_integers() -> None:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))
    a = aggregators.build("foolsgold")(x, client_ids=np.array([7, 8, 9]))
    b = aggregators.build("foolsgold")(x, client_ids=torch.tensor([7, 8, 9]))
    assert torch.equal(a.scores, b.scores)


def test_a_rejected_call_leaves_the_history_unchanged() -> None:
    rule = aggregators.build("foolsgold")
    rule(torch.randn(3, 4), client_ids=[1, 2, 3])
    before = rule.state_dict()
    with pytest.raises(ValueError, match="client 1 has a history of 4 values, this update has 5"):
        rule(torch.randn(2, 5), client_ids=[9, 1])
    assert rule.state_dict()["history"].keys() == before["history"].keys()
    with pytest.raises(ValueError, match="weights must have shape"):
        rule(torch.randn(2, 4), weights=torch.ones(3), client_ids=[9, 1])
    assert 9 not in rule.state_dict()["history"]


def test_mixing_row_index_and_client_id_keying_is_refused() -> None:
    rule = aggregators.build("foolsgold")
    rule(torch.randn(3, 4))
    with pytest.raises(ValueError, match="history is keyed by row-index but this call is keyed by client-ids"):
        rule(torch.randn(3, 4), client_ids=[1, 2, 3])


# --- as a pre-aggregation step ------------------------------------------------------------------------


def test_step_scales_rows_by_their_weight_and_drops_the_sybils() -> None:
    g = torch.Generator().manual_seed(5)
    chain = aggregators.build("median", pre=["foolsgold"])
    assert chain.uses_client_ids
    ids = HONEST_IDS + SYBIL_IDS
    for _ in range(3):
        out = chain(sybil_round(g), client_ids=ids)
    assert out.selected.tolist() == [True] * 7 + [False] * 3
    step = FoolsGoldReweighting()
    x = sybil_round(g)
    scaled, mixing = step(x, client_ids=ids)
    assert scaled.shape == (7, x.shape[1]) and torch.allclose(scaled, mixing @ x)


def test_chain_passes_ids_through_steps_that_keep_one_client_per_row() -> None:
    g = torch.Generator().manual_seed(6)
    ids = HONEST_IDS + SYBIL_IDS
    chain = aggregators.build("foolsgold", pre=["clip:norm=3.0", "flame"])
    assert chain.uses_client_ids
    out = chain(sybil_round(g), client_ids=ids)
    assert out.vector.shape == (300,)
    # nnm mixes clients into every row: FoolsGold after it cannot be keyed, and says so.
    mixed = aggregators.build("foolsgold", num_byzantine=1, pre=["nnm"])
    with pytest.raises(ValueError, match="foolsgold: needs one client per row, but step 'nnm' mixed"):
        mixed(sybil_round(g), client_ids=ids)
    with pytest.raises(ValueError, match="got 2 client_ids for 10 rows"):
        chain(sybil_round(g), client_ids=[1, 2])
    # Chains without an id-keyed part ignore nothing and need nothing.
    assert not getattr(aggregators.build("mean", pre=["clip"]), "uses_client_ids")


# --- properties --------------------------------------------------------------------------------------


@FAST
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 20),
    rounds=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_properties_on_random_rounds(n: int, d: int, rounds: int, seed: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(1000, generator=g)[:n].tolist()
    perm = torch.randperm(n, generator=g)
    rule, shuffled_rule = aggregators.build("foolsgold"), aggregators.build("foolsgold")
    for _ in range(rounds):
        x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
        out = rule(x, client_ids=ids)
        shuffled = shuffled_rule(x[perm], client_ids=[ids[i] for i in perm.tolist()])
        assert out.vector.dtype == dtype and out.vector.shape == (d,) and bool(torch.isfinite(out.vector).all())
        assert bool(((out.scores >= 0) & (out.scores <= 1)).all())
        # Keyed by id, the row order does not matter.
        assert torch.allclose(shuffled.scores, out.scores[perm], rtol=1e-9, atol=1e-12)
        assert torch.equal(shuffled.selected, out.selected[perm])
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        assert torch.allclose(shuffled.vector, out.vector, rtol=tol, atol=tol)
        # At least the least similar client keeps a full weight (unless all histories have twins).
        assert float(out.scores.min()) == 0.0 or not bool(out.selected.any())


def test_the_torch_kernels_of_other_devices_agree() -> None:
    from aggregators.blocks import portable_kernels

    g = torch.Generator().manual_seed(7)
    stacks = [sybil_round(g, dtype=torch.float32) for _ in range(3)]
    ids = HONEST_IDS + SYBIL_IDS
    numpy_rule, torch_rule = aggregators.build("foolsgold"), aggregators.build("foolsgold")
    for x in stacks:
        want = numpy_rule(x, client_ids=ids)
        with portable_kernels():
            got = torch_rule(x, client_ids=ids)
        assert torch.equal(got.selected, want.selected)
        assert torch.allclose(got.scores, want.scores, rtol=1e-9, atol=1e-12)
        assert torch.allclose(got.vector, want.vector, rtol=1e-6, atol=1e-7)
