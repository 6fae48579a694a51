"""TrainingMonitor: robust band alerts on the central evaluation curve."""

from __future__ import annotations

import json
import math

import pytest

from server.monitor import TrainingMonitor


def feed(monitor: TrainingMonitor, losses, accuracies=None) -> dict[int, list[str]]:
    """Observe rounds 1..n; return the rounds that alerted with their messages."""
    accuracies = accuracies or [None] * len(losses)
    fired = {}
    for r, (loss, acc) in enumerate(zip(losses, accuracies), start=1):
        messages = monitor.observe(r, loss, acc)
        if messages:
            fired[r] = messages
    return fired


def test_loss_jump_alerts_in_exactly_that_round():
    steady = [0.50, 0.48, 0.51, 0.49, 0.50, 0.52, 0.49]
    losses = steady + [2.3] + [0.50, 0.49, 0.51]
    monitor = TrainingMonitor(window=5, k=4.0, min_history=3)
    fired = feed(monitor, losses)
    assert list(fired) == [8]
    alert = monitor.alerts[0]
    assert (alert["round"], alert["metric"], alert["value"]) == (8, "loss", 2.3)
    low, high = alert["band"]
    assert low < 0.5 < high < 2.3
    assert "round 8" in fired[8][0] and "loss" in fired[8][0]


def test_band_is_median_plus_k_robust_sd():
    monitor = TrainingMonitor(window=5, k=4.0, min_history=3)
    feed(monitor, [1.0, 1.2, 1.1, 0.9, 1.0])
    # median 1.0, |x - 1| = 0, .2, .1, .1, 0 -> MAD 0.1 -> scale 0.14826
    low, high = monitor.band("loss")
    assert (low, high) == pytest.approx((1.0 - 4 * 0.14826, 1.0 + 4 * 0.14826))
    just_inside = TrainingMonitor(window=5, k=4.0, min_history=3)
    feed(just_inside, [1.0, 1.2, 1.1, 0.9, 1.0])
    assert just_inside.observe(6, high - 1e-9, None) == []
    assert monitor.observe(6, high + 1e-9, None) != []


def test_smoothly_decreasing_loss_and_rising_accuracy_never_alert():
    losses = [2.0 * math.exp(-0.3 * r) + 0.1 for r in range(30)]
    accuracies = [0.95 - 0.85 * math.exp(-0.3 * r) for r in range(30)]
    monitor = TrainingMonitor()
    assert feed(monitor, losses, accuracies) == {}
    assert monitor.alerts == []


def test_accuracy_drop_alerts_and_the_history_is_robust_to_it():
    accuracies = [0.90, 0.91, 0.90, 0.92, 0.91, 0.40, 0.91, 0.92]
    losses = [0.3, 0.29, 0.3, 0.28, 0.29, 0.29, 0.28, 0.28]
    monitor = TrainingMonitor()
    fired = feed(monitor, losses, accuracies)
    assert list(fired) == [6]
    assert monitor.alerts[0]["metric"] == "accuracy"


def test_flat_curve_uses_the_floor_not_a_zero_width_band():
    monitor = TrainingMonitor(window=5, k=4.0, min_history=3)
    feed(monitor, [0.5] * 5, [0.8] * 5)
    # MAD 0: loss scale 2% of 0.5, accuracy scale 0.01.
    assert monitor.band("loss") == pytest.approx((0.5 - 0.04, 0.5 + 0.04))
    assert monitor.band("accuracy") == pytest.approx((0.76, 0.84))
    assert monitor.observe(6, 0.53, 0.77) == []
    assert len(monitor.observe(7, 0.55, 0.75)) == 2


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_alerts_even_without_history(bad):
    monitor = TrainingMonitor()
    messages = monitor.observe(1, bad, 0.1)
    assert len(messages) == 1 and str(bad) in messages[0]
    assert monitor.alerts[0]["value"] is None and monitor.alerts[0]["band"] is None
    # It stays out of the history, so the band is not poisoned by it.
    assert monitor.history == [{"round": 1, "loss": None, "accuracy": 0.1}]
    json.dumps(monitor.alerts, allow_nan=False)


def test_no_alert_before_min_history():
    monitor = TrainingMonitor(min_history=3)
    assert feed(monitor, [0.1, 5.0, 0.1]) == {}  # only 0-2 values of history each time
    assert monitor.band("loss") is not None


def test_step_up_keeps_alerting_until_it_is_the_new_normal():
    monitor = TrainingMonitor(window=5, k=4.0, min_history=3)
    fired = feed(monitor, [0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0])
    assert list(fired) == [6, 7, 8]  # from round 9 three of the last five are 1.0


def test_missing_metric_is_not_checked():
    monitor = TrainingMonitor()
    assert feed(monitor, [0.5, 0.5, 0.5, None]) == {}
    assert monitor.history[-1] == {"round": 4, "loss": None, "accuracy": None}


def test_state_roundtrips_through_json_and_continues_identically():
    losses = [0.5, 0.48, 0.51, math.nan, 0.49, 2.0]
    monitor = TrainingMonitor()
    feed(monitor, losses, [0.8] * len(losses))
    restored = TrainingMonitor()
    restored.load_state_dict(json.loads(json.dumps(monitor.state_dict(), allow_nan=False)))
    assert restored.alerts == monitor.alerts and restored.history == monitor.history
    assert restored.observe(7, 3.0, 0.5) == monitor.observe(7, 3.0, 0.5)


def test_bad_settings_and_rounds_are_named():
    with pytest.raises(ValueError, match="window"):
        TrainingMonitor(window=0)
    with pytest.raises(ValueError, match="min_history"):
        TrainingMonitor(window=3, min_history=4)
    with pytest.raises(ValueError, match="k must be"):
        TrainingMonitor(k=0)
    monitor = TrainingMonitor()
    monitor.observe(3, 0.5, 0.5)
    with pytest.raises(ValueError, match="round 3 observed after round 3"):
        monitor.observe(3, 0.5, 0.5)
    with pytest.raises(ValueError, match="metric"):
        monitor.band("f1")
    with pytest.raises(ValueError, match="format"):
        monitor.load_state_dict({})


# Curves measured on digits (10 IID clients, mean): a clean run, and one where 3 sign-flip x10
# attackers start in round 6, while training still falls fast and the level band is wide.
CLEAN_LOSS = [2.012, 1.387, 0.828, 0.57, 0.438, 0.367, 0.308, 0.281, 0.255, 0.236]
CLEAN_ACCURACY = [0.760, 0.838, 0.872, 0.889, 0.903, 0.908, 0.914, 0.933, 0.928, 0.925]
POISONED_LOSS = [1.912, 1.148, 0.66, 0.465, 0.354, 0.704, 2.892]
POISONED_ACCURACY = [0.844, 0.855, 0.875, 0.9, 0.919, 0.763, 0.181]


def test_the_trend_band_catches_a_poisoned_round_the_level_band_misses():
    monitor = TrainingMonitor()
    for server_round, (loss, accuracy) in enumerate(zip(POISONED_LOSS[:5], POISONED_ACCURACY[:5]), start=1):
        assert monitor.observe(server_round, loss, accuracy) == []
    low, _ = monitor.band("accuracy")
    assert POISONED_ACCURACY[5] > low  # inside the level band...
    messages = monitor.observe(6, POISONED_LOSS[5], POISONED_ACCURACY[5])
    assert messages and "trend" in messages[0]  # ...but far below the forecast


def test_a_clean_measured_run_raises_no_alert():
    monitor = TrainingMonitor()
    for server_round, (loss, accuracy) in enumerate(zip(CLEAN_LOSS, CLEAN_ACCURACY), start=1):
        assert monitor.observe(server_round, loss, accuracy) == [], server_round
