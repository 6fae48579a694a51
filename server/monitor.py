"""Watch the central evaluation curve and raise an alert when a round breaks from the recent trend.

A successful poisoning round, a diverging learning rate or a broken aggregate shows up as a
sudden jump of the evaluation loss or drop of the accuracy. The monitor compares each round
with a robust band around the last ``window`` rounds::

    scale = max(1.4826 * MAD, floor)
    loss alert      when  loss     > median + k * scale
    accuracy alert  when  accuracy < median - k * scale

where median and MAD (median absolute deviation) are over the last ``window`` finite values of
that metric. The floors keep a flat curve (MAD 0) from alerting on noise: for the loss
``max(loss_rel_floor * |median|, loss_abs_floor)`` (defaults: 2% of the median, so with k = 4 a
flat loss must rise by about 12% to alert), for the accuracy ``accuracy_floor`` (default 0.01,
so a flat accuracy must fall by about 6 points). No band is drawn until ``min_history`` finite
values exist. A non-finite loss or accuracy always alerts and never enters the history.

Early in training the curve falls fast, the level band is wide and a poisoned round can hide
inside it. A second, trend band therefore forecasts each round from the previous one plus the
median one-round change of the window, with the same robust scale computed over those changes::

    forecast = last + median(changes), counting only a drift the bad way (loss up, accuracy down)
    loss alert      when  loss     > forecast + k * max(1.4826 * MAD(changes), floor)
    accuracy alert  when  accuracy < forecast - k * max(1.4826 * MAD(changes), floor)

A round alerts when it leaves either band (the alert names which).

Only the bad direction alerts (a falling loss or rising accuracy is what training should do).
A persistent step up keeps alerting until it fills half the window and becomes the new median.
"""

from __future__ import annotations

import math
import statistics

#: MAD -> standard deviation of a normal distribution.
MAD_TO_SD = 1.4826
#: Version of the ``state_dict`` layout.
STATE_FORMAT = 1
METRICS = ("loss", "accuracy")


class TrainingMonitor:
    """Alerts on evaluation loss and accuracy that leave a robust band of the recent rounds.

    Parameters
    ----------
    window : int
        Number of most recent finite values per metric the band is computed from; >= 1.
    k : float
        Band half-width in robust standard deviations; > 0.
    min_history : int
        Finite values needed before a band exists (no alerts for outliers before that); in
        ``[1, window]``.
    loss_rel_floor : float
        Floor on the loss scale relative to the median loss.
    loss_abs_floor : float
        Absolute floor on the loss scale; > 0.
    accuracy_floor : float
        Floor on the accuracy scale (accuracy in ``[0, 1]``); > 0.

    Attributes
    ----------
    alerts : list[dict]
        Every alert so far: ``{"round", "metric", "value", "band", "message"}``; ``value`` is
        None for a non-finite value (the message names it), ``band`` is ``[low, high]`` or None
        when there was not enough history.
    history : list[dict]
        ``{"round", "loss", "accuracy"}`` per observed round (None where not finite or not
        measured).

    Raises
    ------
    ValueError
        On a parameter out of range (the message names it).
    """

    def __init__(self, window: int = 5, k: float = 4.0, min_history: int = 3, *, loss_rel_floor: float = 0.02,
                 loss_abs_floor: float = 1e-3, accuracy_floor: float = 0.01) -> None:
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"monitor window must be an integer >= 1, got {window!r}")
        if not (isinstance(k, (int, float)) and k > 0 and math.isfinite(k)):
            raise ValueError(f"monitor k must be a positive number, got {k!r}")
        if not (isinstance(min_history, int) and 1 <= min_history <= window):
            raise ValueError(f"monitor min_history must be an integer in [1, window={window}], got {min_history!r}")
        if not (loss_rel_floor >= 0 and loss_abs_floor > 0 and accuracy_floor > 0):
            raise ValueError("monitor floors: need loss_rel_floor >= 0, loss_abs_floor > 0 and accuracy_floor > 0, "
                             f"got {loss_rel_floor}, {loss_abs_floor}, {accuracy_floor}")
        self.window = window
        self.k = float(k)
        self.min_history = min_history
        self.loss_rel_floor = float(loss_rel_floor)
        self.loss_abs_floor = float(loss_abs_floor)
        self.accuracy_floor = float(accuracy_floor)
        self.alerts: list[dict] = []
        self.history: list[dict] = []

    def band(self, metric: str) -> tuple[float, float] | None:
        """The current ``(low, high)`` band of ``"loss"`` or ``"accuracy"``, None before ``min_history``."""
        if metric not in METRICS:
            raise ValueError(f"monitor metric must be one of {METRICS}, got {metric!r}")
        recent = [h[metric] for h in self.history if h[metric] is not None][-self.window:]
        if len(recent) < self.min_history:
            return None
        median = statistics.median(recent)
        mad = statistics.median(abs(v - median) for v in recent)
        scale = max(MAD_TO_SD * mad, self._floor(metric, median))
        return median - self.k * scale, median + self.k * scale

    def trend_band(self, metric: str) -> tuple[float, float] | None:
        """The ``(low, high)`` band around the one-round-ahead forecast, None before ``min_history`` changes."""
        if metric not in METRICS:
            raise ValueError(f"monitor metric must be one of {METRICS}, got {metric!r}")
        recent = [h[metric] for h in self.history if h[metric] is not None][-(self.window + 1):]
        changes = [b - a for a, b in zip(recent, recent[1:])]
        if len(changes) < self.min_history:
            return None
        median = statistics.median(changes)
        mad = statistics.median(abs(c - median) for c in changes)
        # Never extrapolate improvement: a decelerating fall would put the forecast too far ahead.
        drift = max(median, 0.0) if metric == "loss" else min(median, 0.0)
        forecast = recent[-1] + drift
        scale = max(MAD_TO_SD * mad, self._floor(metric, recent[-1]))
        return forecast - self.k * scale, forecast + self.k * scale

    def _floor(self, metric: str, level: float) -> float:
        if metric == "loss":
            return max(self.loss_rel_floor * abs(level), self.loss_abs_floor)
        return self.accuracy_floor

    def observe(self, server_round: int, loss: float | None, accuracy: float | None) -> list[str]:
        """Check one round's central evaluation and add it to the history.

        Parameters
        ----------
        server_round : int
            The round; must be later than the last observed one.
        loss : float | None
            Central evaluation loss (None: not measured this round; no check).
        accuracy : float | None
            Central evaluation accuracy in ``[0, 1]`` (None: not measured).

        Returns
        -------
        list[str]
            This round's alert messages; empty when nothing is unusual.

        Raises
        ------
        ValueError
            If the round is not later than the last observed round.
        """
        server_round = int(server_round)
        if self.history and server_round <= self.history[-1]["round"]:
            raise ValueError(f"monitor: round {server_round} observed after round {self.history[-1]['round']}")
        messages: list[str] = []
        entry: dict = {"round": server_round}
        for metric, value in (("loss", loss), ("accuracy", accuracy)):
            entry[metric] = None
            if value is None:
                continue
            value = float(value)
            alert = self._check(server_round, metric, value)
            if alert is not None:
                self.alerts.append(alert)
                messages.append(alert["message"])
            if math.isfinite(value):
                entry[metric] = value
        self.history.append(entry)
        return messages

    def _check(self, server_round: int, metric: str, value: float) -> dict | None:
        band = self.band(metric)
        band_list = None if band is None else [band[0], band[1]]
        if not math.isfinite(value):
            return {"round": server_round, "metric": metric, "value": None, "band": band_list,
                    "message": f"round {server_round}: {metric} is {value} (training diverged or the model broke)"}
        recent = min(self.window, sum(h[metric] is not None for h in self.history))
        for kind, bounds in (("level", band), ("trend", self.trend_band(metric))):
            if bounds is None:
                continue
            low, high = bounds
            if metric == "loss" and value > high:
                where = f"above the {kind} band's top {high:.4g}"
            elif metric == "accuracy" and value < low:
                where = f"below the {kind} band's bottom {low:.4g}"
            else:
                continue
            centre = (low + high) / 2.0
            basis = "median" if kind == "level" else "forecast"
            return {"round": server_round, "metric": metric, "value": value, "band": [low, high], "kind": kind,
                    "message": f"round {server_round}: {metric} {value:.4g} {where} "
                               f"({basis} {centre:.4g} from the last {recent} rounds, k = {self.k:g})"}
        return None

    def amend(self, server_round: int, loss: float | None, accuracy: float | None) -> None:
        """Replace the last observed round's values (its alerts stay): after a rollback, the
        history must describe the model that was kept, or a persistent attack would fill the
        window with poisoned values and stop alerting."""
        if not self.history or self.history[-1]["round"] != int(server_round):
            raise ValueError(f"monitor: round {server_round} is not the last observed round")
        for metric, value in (("loss", loss), ("accuracy", accuracy)):
            self.history[-1][metric] = float(value) if value is not None and math.isfinite(float(value)) else None

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """JSON-able history and alerts (settings included for reference)."""
        return {"format": STATE_FORMAT, "window": self.window, "k": self.k, "min_history": self.min_history,
                "history": [dict(h) for h in self.history], "alerts": [dict(a) for a in self.alerts]}

    def load_state_dict(self, state: dict) -> None:
        """Restore history and alerts; settings stay those given to the constructor.

        Raises
        ------
        ValueError
            If the state is not of this format or a history entry is malformed.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"monitor state: expected a dict with format {STATE_FORMAT}")
        history: list[dict] = []
        try:
            for entry in state["history"]:
                row = {"round": int(entry["round"])}
                for metric in METRICS:
                    value = entry[metric]
                    row[metric] = None if value is None else float(value)
                    if row[metric] is not None and not math.isfinite(row[metric]):
                        raise ValueError(f"non-finite {metric} in round {row['round']}")
                history.append(row)
            alerts = [dict(a) for a in state["alerts"]]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"monitor state: malformed history or alerts ({error})") from None
        self.history, self.alerts = history, alerts
