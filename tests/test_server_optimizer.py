"""Specification of the server optimizer (server/optimizer.py): FedAvg, FedAvgM, FedAdam, FedYogi.

FedAdam and FedYogi are checked against a direct numpy transcription of Reddi et al.'s Algorithm 2
and against Flower 1.42's own ``FedAdam``/``FedYogi`` strategies, driven through their
``aggregate_train`` on one reply per round (no Grid needed).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.optimizer import ServerOptimizer


def rounds(seed: int, d: int, count: int, scale: float = 1e-2) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [scale * rng.normal(size=d) for _ in range(count)]


def run(optimizer: ServerOptimizer, x0: np.ndarray, deltas: list[np.ndarray]) -> list[np.ndarray]:
    x = torch.from_numpy(x0.copy())
    path = []
    for delta in deltas:
        x = optimizer.step(x, torch.from_numpy(delta))
        path.append(x.numpy().copy())
    return path


def paper_fedopt(kind: str, x0: np.ndarray, deltas: list[np.ndarray], eta: float, beta1: float, beta2: float, tau: float) -> list[np.ndarray]:
    """Reddi et al., Algorithm 2, lines for FedAdam / FedYogi, with m_{-1} = v_{-1} = 0."""
    x, m, v = x0.copy(), np.zeros_like(x0), np.zeros_like(x0)
    path = []
    for delta in deltas:
        m = beta1 * m + (1 - beta1) * delta
        if kind == "adam":
            v = beta2 * v + (1 - beta2) * delta**2
        else:
            v = v - (1 - beta2) * delta**2 * np.sign(v - delta**2)
        x = x + eta * m / (np.sqrt(v) + tau)
        path.append(x.copy())
    return path


# --- sgd: FedAvg and FedAvgM -------------------------------------------------------------------


@settings(max_examples=25, derandomize=True, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(1, 50), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_default_is_exactly_global_plus_update(seed: int, d: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    x, delta = torch.randn(d, generator=g, dtype=dtype), 1e-3 * torch.randn(d, generator=g, dtype=dtype)
    optimizer = ServerOptimizer()
    assert optimizer.is_plain
    for _ in range(3):
        new = optimizer.step(x, delta)
        assert torch.equal(new, x + delta) and new.dtype == dtype
        x = new


def test_update_on_another_device_or_dtype_comes_back_in_the_globals() -> None:
    x = torch.zeros(4, dtype=torch.float32)
    new = ServerOptimizer(lr=0.5).step(x, torch.ones(4, dtype=torch.float64))
    assert new.dtype == torch.float32 and torch.equal(new, torch.full((4,), 0.5))


def test_momentum_accumulates_as_fedavgm() -> None:
    # b_1 = delta_1, b_t = mu b_{t-1} + delta_t, x_{t+1} = x_t + lr b_t.
    optimizer = ServerOptimizer(lr=0.5, momentum=0.9)
    x = torch.zeros(1, dtype=torch.float64)
    seen = []
    for delta in (1.0, 1.0, -2.0):
        x = optimizer.step(x, torch.tensor([delta], dtype=torch.float64))
        seen.append(x.item())
    # b = 1, 1.9, -0.29; x = 0.5, 1.45, 1.305
    assert seen == pytest.approx([0.5, 1.45, 1.305], abs=1e-15)


def test_float64_stays_float64_and_inputs_are_not_modified() -> None:
    x, delta = torch.ones(3, dtype=torch.float64), torch.full((3,), 0.1, dtype=torch.float64)
    before = (x.clone(), delta.clone())
    for optimizer in (ServerOptimizer(momentum=0.5), ServerOptimizer("adam", lr=0.1), ServerOptimizer("yogi", lr=0.1)):
        assert optimizer.step(x, delta).dtype == torch.float64
    assert torch.equal(x, before[0]) and torch.equal(delta, before[1])


# --- FedAdam / FedYogi against the paper and against Flower -----------------------------------


@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_fedopt_matches_the_papers_equations(kind: str) -> None:
    x0 = np.random.default_rng(1).normal(size=40)
    deltas = rounds(2, 40, 8)
    ours = run(ServerOptimizer(kind, lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3), x0, deltas)
    paper = paper_fedopt(kind, x0, deltas, eta=0.05, beta1=0.9, beta2=0.99, tau=1e-3)
    for got, want in zip(ours, paper):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_fedopt_matches_flowers_strategy(kind: str) -> None:
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAdam, FedYogi
    from flwr.supercore.task_identity import TaskIdentity

    # The ServerApp runtime sets the identity that messages carry; do the same here.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    params = dict(eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)
    flower = (FedAdam if kind == "adam" else FedYogi)(**params)
    ours = ServerOptimizer(kind, lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3, bias_correction=kind == "adam")
    x = np.random.default_rng(3).normal(size=30)
    ours_x = torch.from_numpy(x.copy())
    for server_round, delta in enumerate(rounds(4, 30, 6), start=1):
        flower.current_arrays = {"w": x.copy()}  # what configure_train records each round
        ask = Message(RecordDict({}), dst_node_id=7, message_type="train")
        content = RecordDict({"arrays": ArrayRecord({"w": Array(x + delta)}), "metrics": MetricRecord({"num-examples": 5})})
        arrays, _ = flower.aggregate_train(server_round, [Message(content, reply_to=ask)])
        x = arrays["w"].numpy()
        # Flower takes delta_t = aggregate - current: feed the same float64 difference.
        seen = (torch.from_numpy(flower.current_arrays["w"] + delta) - torch.from_numpy(flower.current_arrays["w"]))
        ours_x = ours.step(ours_x, seen)
        np.testing.assert_allclose(ours_x.numpy(), x, rtol=1e-12, atol=1e-14)


def test_fedadam_bias_correction_is_flowers_formula() -> None:
    plain = ServerOptimizer("adam", lr=0.1)
    corrected = ServerOptimizer("adam", lr=0.1, bias_correction=True)
    x, delta = torch.zeros(1, dtype=torch.float64), torch.tensor([1e-2], dtype=torch.float64)
    moved_plain = plain.step(x, delta).item()
    moved_corrected = corrected.step(x, delta).item()
    assert moved_corrected == pytest.approx(moved_plain * math.sqrt(1 - 0.99**2) / (1 - 0.9**2), rel=1e-12)


def test_yogi_second_moment_grows_additively() -> None:
    # v_0 = 0 < delta^2: sign = -1, v_1 = (1 - beta2) delta^2 (as FedAdam), then v grows by
    # (1 - beta2) delta^2 while v < delta^2, where FedAdam would shrink the old v by beta2.
    optimizer = ServerOptimizer("yogi", lr=0.1, beta2=0.5)
    x, delta = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    optimizer.step(x, delta)
    assert optimizer.second_moment.item() == pytest.approx(0.5)
    optimizer.step(x, delta)
    assert optimizer.second_moment.item() == pytest.approx(1.0)
    optimizer.step(x, delta)  # v == delta^2: sign 0, v stays
    assert optimizer.second_moment.item() == pytest.approx(1.0)


# --- state --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: ServerOptimizer(momentum=0.9, lr=0.7),
    lambda: ServerOptimizer("adam", lr=0.05, bias_correction=True),
    lambda: ServerOptimizer("yogi", lr=0.05, tau=1e-4),
])
def test_state_round_trip_gives_an_identical_continuation(make) -> None:
    x0 = np.random.default_rng(5).normal(size=20).astype(np.float32)
    deltas = [d.astype(np.float32) for d in rounds(6, 20, 6)]
    uninterrupted = make()
    path = run(uninterrupted, x0, deltas)
    first = make()
    x = torch.from_numpy(run(first, x0, deltas[:3])[-1])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # through a checkpoint file: plain tensors only
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for step, delta in enumerate(deltas[3:], start=3):
        x = resumed.step(x, torch.from_numpy(delta))
        assert torch.equal(x, torch.from_numpy(path[step]))


def test_state_dict_is_a_snapshot() -> None:
    optimizer = ServerOptimizer(momentum=0.5)
    x = torch.zeros(2)
    optimizer.step(x, torch.ones(2))
    state = optimizer.state_dict()
    optimizer.step(x, torch.ones(2))
    assert torch.equal(state["momentum_buffer"], torch.ones(2, dtype=torch.float64))
    assert state["steps"] == 1


def test_state_of_another_kind_is_refused() -> None:
    state = ServerOptimizer("adam").state_dict()
    with pytest.raises(ValueError, match="state is for kind 'adam', this optimizer is 'yogi'"):
        ServerOptimizer("yogi").load_state_dict(state)


# --- validation and summary ----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "rmsprop"}, r"kind must be one of \['sgd', 'adam', 'yogi'\], got 'rmsprop'"),
    ({"lr": 0.0}, r"lr must be a number in \(0, inf\), got 0.0"),
    ({"lr": float("nan")}, "lr must be a number"),
    ({"momentum": 1.0}, r"momentum must be a number in \[0, 1\), got 1.0"),
    ({"momentum": -0.1}, "momentum must be a number"),
    ({"kind": "adam", "beta1": 1.0}, r"beta1 must be a number in \[0, 1\)"),
    ({"kind": "adam", "beta2": -1}, r"beta2 must be a number in \[0, 1\)"),
    ({"kind": "yogi", "tau": 0.0}, r"tau must be a number in \(0, inf\)"),
    ({"kind": "adam", "momentum": 0.9}, "momentum applies to kind 'sgd' only"),
    ({"kind": "yogi", "bias_correction": True}, "bias_correction applies to kind 'adam' only"),
    ({"lr": True}, "lr must be a number"),
])
def test_bad_parameters_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerOptimizer(**kwargs)


def test_bad_inputs_are_named() -> None:
    optimizer = ServerOptimizer("adam")
    with pytest.raises(ValueError, match="aggregate_update has shape"):
        optimizer.step(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        optimizer.step(torch.zeros(2), torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="global_vector must be a 1-D floating tensor"):
        optimizer.step(torch.zeros(2, dtype=torch.int64), torch.zeros(2))
    optimizer.step(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="state has 2 values, global_vector 3"):
        optimizer.step(torch.zeros(3), torch.ones(3))


def test_summary_and_run_config() -> None:
    assert ServerOptimizer().summary() == "server optimizer: sgd (FedAvg), lr=1, momentum=0"
    built = ServerOptimizer.from_run_config({"server-optimizer": "Yogi", "server-lr": 1, "server-tau": 1e-4, "lr": 0.3})
    assert (built.kind, built.lr, built.tau) == ("yogi", 1.0, 1e-4)
    assert built.summary() == "server optimizer: yogi (FedYogi), lr=1, beta1=0.9, beta2=0.99, tau=0.0001"
    with pytest.raises(ValueError, match="momentum applies to kind 'sgd' only"):
        ServerOptimizer.from_run_config({"server-optimizer": "adam", "server-momentum": 0.9})


# --- running statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: ServerOptimizer("sgd", lr=1.0, momentum=0.9),
                                  lambda: ServerOptimizer("adam", lr=0.1), lambda: ServerOptimizer("yogi", lr=0.1)])
def test_running_statistics_take_the_aggregate_as_it_is(make) -> None:
    """Momentum or an adaptive step on a BatchNorm variance can push it below zero (a NaN model):
    the coordinates marked as statistics move by the aggregate alone, the others as without a mask."""
    deltas = rounds(3, 6, 5, scale=0.5)
    statistics = torch.tensor([False, False, False, True, True, False])
    masked, plain = make(), make()
    x = torch.ones(6, dtype=torch.float64)
    y = x.clone()
    for delta in deltas:
        update = torch.from_numpy(delta)
        expected_statistics = x[statistics] + update[statistics]
        x = masked.step(x, update, statistics=statistics)
        y = plain.step(y, update.masked_fill(statistics, 0.0))
        torch.testing.assert_close(x[statistics], expected_statistics, rtol=0, atol=0)
        torch.testing.assert_close(x[~statistics], y[~statistics], rtol=0, atol=0)


def test_a_variance_shrinking_every_round_stays_positive_under_momentum() -> None:
    """A running variance that the clients shrink by 40% each round never crosses zero."""
    optimizer = ServerOptimizer("sgd", momentum=0.9)
    variance = torch.ones(1, dtype=torch.float64)
    for _ in range(10):
        variance = optimizer.step(variance, -0.4 * variance, statistics=torch.ones(1, dtype=torch.bool))
    assert float(variance) > 0


def test_the_spec_marks_batchnorm_running_statistics() -> None:
    from flwr.app import ArrayRecord

    from server.params import ParamSpec

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    spec = ParamSpec.of(ArrayRecord(model.state_dict()))
    # Linear weight (6) and bias (2), BatchNorm weight (2), bias (2), running_mean (2), running_var (2).
    assert spec.statistics_mask.tolist() == [False] * 12 + [True] * 4
