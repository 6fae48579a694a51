"""Differential privacy that composes with robust aggregation: clipping, noise, adaptive clipping, accounting.

Flower's DP wrappers only account for FedAvg and break on zero or NaN updates. This module works with
any aggregation rule that can bound its own sensitivity, and its clipping is exact on zero, tiny, huge
and non-finite rows.

The unit of privacy is one client's whole local dataset (user-level DP). Two modes:

``dp=central`` (a trusted server adds the noise)
    Each round the server picks ``m`` of the ``N`` clients at random (Flower's ``fraction-train``
    picks a fixed number). It clips every update to L2 norm ``C``, aggregates the ``n`` clipped
    updates with the rule ``A``, and adds ``N(0, sigma^2 I)`` noise to the aggregate, where
    ``sigma = z * A.sensitivity(C, n)`` (see :func:`central_noise_std`). The accountant reports
    ``epsilon`` for the sequence of global models released over the rounds, at sampling rate
    ``q = m / N``.

``dp=client`` (each client adds noise to its own update; local DP)
    The client clips its update to ``C`` and adds ``N(0, (2 z C)^2 I)`` noise
    (:func:`privatize_update`). ``epsilon`` is per client, counted over the rounds that client took part
    in, with ``q = 1`` for each of them: the Gaussian mechanism composed once per participation. It
    bounds what anyone who sees the noisy update (the server included) can learn about that client's
    data. The server's robust aggregation of noisy updates is post-processing and costs nothing.

Neighbouring relations, and how they fit together
------------------------------------------------
*Sensitivity of an aggregator, replace-one with n fixed.* ``A.sensitivity(C, n)`` bounds
``||A(U) - A(U')||_2`` over every pair of stacks of ``n`` updates of norm ``<= C`` that differ in one row.
For the mean this is ``2C/n``, for the trimmed mean ``2C/(n - 2f)``, for the median and Krum ``2C``.
Robust rules can only bound a replacement: their output depends on ``n`` through ``f``, so adding or
removing a row has no simple bound. The factor 2 comes from ``||u - u'|| <= 2C``.

*Accounting, add/remove one client under Poisson sampling.* The RDP accountant (Mironov, Talwar
and Zhang 2019) and the PLD accountant bound the subsampled Gaussian mechanism for datasets that
differ by one client being present or absent. Both directions are covered.

*The bridge.* Take the population with client ``x`` (``N + 1`` clients) and without it (``N``), both
sampling ``m`` clients a round. With ``x``, the round is absent-``x`` with probability ``1 - p`` and
present-``x`` with probability ``p = m / (N + 1)``. Without ``x``, draw the ``m - 1`` other sampled clients
``S`` and one more client ``y``: then the absent case aggregates ``S + {y}``, and the present case
aggregates ``S + {x}``. For every ``(S, y)`` these two stacks have the same ``n`` and differ in one row,
so the means of their Gaussians are at most ``Delta = A.sensitivity(C, n)`` apart. Because the
Renyi-divergence power ``E_Q[(P/Q)^alpha]`` is jointly convex, mixing over ``(S, y)`` cannot make things
worse than a single pair of Gaussians ``Delta`` apart. So each round is bounded by the subsampled
Gaussian at rate ``p`` and noise multiplier ``z``, which is what the accountant computes. The
accountant uses ``q = m / N >= p``, and the bound grows with ``q``, so it stays valid. With ``q = 1``
(every client every round) the mechanism is plain Gaussian and the relation is simply replace-one.

Three things follow:

* ``n`` must not depend on the clients' data. Picking clients at random is fine. Rejecting a reply
  because of what is in it (e.g. a NaN update) makes ``n`` depend on the data. To keep the guarantee,
  count a rejected reply as a null client: a zero update with ``n`` unchanged.
* ``epsilon`` covers the released global models only. Per-client records such as anomaly scores and
  the accepted/rejected lists in the audit log are not noised. That fits central DP, where the
  server is trusted.
* In ``dp=client`` the guarantee is local DP between any two datasets of one client. The released
  update has replace-one sensitivity ``2C``, hence the ``2 z C`` noise std: the same convention as the
  median's ``2C``.

Adaptive clipping (:class:`AdaptiveClipper`) follows Andrew et al. 2021, *Differentially Private
Learning with Adaptive Clipping*. One departure: it accounts for the clipped-count release under the
same replace-one bridge (see :meth:`AdaptiveClipper.effective_noise_multiplier`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from client.privacy import (
    _check_clip_norm,
    _check_noise_multiplier,
    clip_update,
    clip_updates,
    gaussian_noise_like,
    local_noise_std,
    privatize_update,
    update_norms,
)

__all__ = [
    "AdaptiveClipper",
    "DPConfigError",
    "PrivacyAccountant",
    "central_noise_std",
    "clip_update",
    "clip_updates",
    "epsilon_for",
    "gaussian_noise_like",
    "local_noise_std",
    "privatize_update",
    "update_norms",
]

#: The accountants this module can run.
ACCOUNTANTS = ("rdp", "pld")

#: PLD discretisation. The PLD accountant rounds pessimistically, so a coarser grid still gives an
#: upper bound. At 1e-3 it agrees with 1e-4 to ~1e-5 in epsilon and runs about 10x faster.
_PLD_DISCRETIZATION = 1e-3


class DPConfigError(ValueError):
    """A differential-privacy setting that cannot give the guarantee it asks for."""


# Clipping and noise primitives (update_norms, clip_updates, clip_update, gaussian_noise_like,
# local_noise_std, privatize_update) live in client.privacy: the ClientApp's dp=client uses them
# and imports nothing from the server. They are re-exported here.


def _is_count(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _rule_name(aggregator: Any) -> str:
    name = getattr(aggregator, "name", None)
    return str(name) if name else type(aggregator).__name__


def central_noise_std(aggregator: Any, *, clip_norm: float, num_clients: int, noise_multiplier: float) -> float:
    """Standard deviation of the noise the server adds to the aggregate in ``dp=central``.

    ``std = noise_multiplier * aggregator.sensitivity(clip_norm, num_clients)``. The sensitivity is
    the replace-one bound with ``n`` fixed; the module docstring explains why that matches the
    accountant.

    Parameters
    ----------
    aggregator : object
        Any aggregation rule. It must expose ``sensitivity(clip_norm, n) -> float``.
    clip_norm : float
        The clip norm applied to every update this round.
    num_clients : int
        ``n``, the number of (clipped) updates that go into the aggregate.
    noise_multiplier : float
        ``z >= 0``. With :class:`AdaptiveClipper`, pass its effective noise multiplier.

    Raises
    ------
    DPConfigError
        If the rule cannot bound its sensitivity, or if the bound is not a finite positive number.
    """
    clip = _check_clip_norm(clip_norm, "central_noise_std")
    z = _check_noise_multiplier(noise_multiplier, "central_noise_std")
    if not _is_count(num_clients):
        raise ValueError(f"central_noise_std: num_clients must be an integer >= 1, got {num_clients!r}")
    sensitivity_of = getattr(aggregator, "sensitivity", None)
    if not callable(sensitivity_of):
        raise DPConfigError(
            f"aggregator {_rule_name(aggregator)!r} does not bound its sensitivity (no sensitivity(clip_norm, n) "
            "method), so central DP cannot calibrate its noise; use dp=client (clients noise their own updates) "
            "or a rule with a known sensitivity such as mean, trimmed-mean, median or krum"
        )
    sensitivity = float(sensitivity_of(clip, int(num_clients)))
    if not math.isfinite(sensitivity) or sensitivity <= 0.0:
        raise DPConfigError(
            f"aggregator {_rule_name(aggregator)!r} reports sensitivity {sensitivity} for clip_norm={clip}, "
            f"n={int(num_clients)}; central DP needs a finite positive bound (use dp=client otherwise)"
        )
    return z * sensitivity


# ----------------------------------------------------------------------------------------------------
# Adaptive clipping
# ----------------------------------------------------------------------------------------------------


class AdaptiveClipper:
    """Clip norm that tracks a target quantile of the update norms (Andrew et al. 2021).

    Each round the server counts the clients whose update norm was within the clip,
    ``b = #{i : ||u_i|| <= C}``. It releases the noisy fraction ``b_noisy = (b + N(0, sigma_b^2)) / n``,
    then updates ``C`` geometrically: ``C <- C * exp(-eta * (b_noisy - target_quantile))``. If more than
    the target fraction fits under ``C``, ``C`` shrinks; otherwise it grows. ``C`` is kept within
    ``[1e-30, 1e30]``, so runs of all-zero updates cannot drive it to 0.

    Parameters
    ----------
    initial_clip : float
        ``C_0 > 0``.
    target_quantile : float
        ``gamma`` in ``[0, 1]``, the fraction of updates to leave unclipped (the paper uses 0.5).
    learning_rate : float
        ``eta > 0``, the geometric step size (the paper's 0.2).
    count_noise_multiplier : float or None
        ``sigma_b >= 0``, the std of the noise added to the count ``b``. ``None`` means ``n / 20``,
        computed from the clients in each round. That is the paper's guidance (``sigma_b = m / 20`` for
        ``m`` clients a round): the count is then accurate to about 5% of the clients, while the update
        noise multiplier is only slightly raised. With few clients, ``n / 20`` is small, and
        :meth:`effective_noise_multiplier` refuses it.
    seed : int or None
        Seeds the count noise.
    """

    MIN_CLIP = 1e-30
    MAX_CLIP = 1e30

    def __init__(
        self,
        initial_clip: float,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        count_noise_multiplier: float | None = None,
        seed: int | None = None,
    ) -> None:
        clip = _check_clip_norm(initial_clip, "AdaptiveClipper")
        if not 0.0 <= float(target_quantile) <= 1.0:
            raise ValueError(f"AdaptiveClipper: target_quantile must be in [0, 1], got {target_quantile}")
        if not math.isfinite(float(learning_rate)) or float(learning_rate) <= 0.0:
            raise ValueError(f"AdaptiveClipper: learning_rate must be a finite number > 0, got {learning_rate}")
        if count_noise_multiplier is not None and (
            not math.isfinite(float(count_noise_multiplier)) or float(count_noise_multiplier) < 0.0
        ):
            raise ValueError(
                f"AdaptiveClipper: count_noise_multiplier must be a finite number >= 0 or None, "
                f"got {count_noise_multiplier}"
            )
        self.clip_norm = clip
        self.initial_clip = clip
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.count_noise_multiplier = None if count_noise_multiplier is None else float(count_noise_multiplier)
        self.seed = seed
        self.rounds = 0
        self._rng = np.random.default_rng(seed)

    def count_noise_std(self, num_clients: int) -> float:
        """``sigma_b`` for a round with ``num_clients`` clients: the configured value, or ``n / 20``."""
        if self.count_noise_multiplier is not None:
            return self.count_noise_multiplier
        if not _is_count(num_clients):
            raise ValueError(f"AdaptiveClipper: num_clients must be an integer >= 1, got {num_clients!r}")
        return num_clients / 20.0

    def update(self, norms: torch.Tensor) -> float:
        """Move the clip norm one step towards the target quantile of this round's pre-clip norms.

        Parameters
        ----------
        norms : torch.Tensor
            ``(n,)`` pre-clip L2 norms of the updates clipped with the current :attr:`clip_norm`,
            e.g. the second output of :func:`clip_updates`.

        Returns
        -------
        float
            The new clip norm, for the next round.
        """
        if not isinstance(norms, torch.Tensor) or norms.ndim != 1 or norms.numel() == 0:
            raise ValueError("AdaptiveClipper.update: norms must be a non-empty 1-D tensor")
        values = norms.detach().to(device="cpu", dtype=torch.float64)
        bad = torch.nonzero(~torch.isfinite(values) | (values < 0)).flatten().tolist()
        if bad:
            raise ValueError(f"AdaptiveClipper.update: norms at positions {bad} are negative or not finite")
        n = values.numel()
        unclipped = float((values <= self.clip_norm).sum())
        sigma_b = self.count_noise_std(n)
        noisy_fraction = (unclipped + (self._rng.normal(0.0, sigma_b) if sigma_b > 0 else 0.0)) / n
        step = math.exp(-self.learning_rate * (noisy_fraction - self.target_quantile))
        self.clip_norm = min(max(self.clip_norm * step, self.MIN_CLIP), self.MAX_CLIP)
        self.rounds += 1
        return self.clip_norm

    def effective_noise_multiplier(self, noise_multiplier: float, num_clients: int | None = None) -> float:
        """Noise multiplier for the update, so that update and count together cost ``noise_multiplier``.

        The round releases two Gaussian mechanisms, the noised aggregate and the noised count. Their
        composition costs the same as one Gaussian mechanism with multiplier ``z``, where
        ``z^-2 = z_update^-2 + (sigma_b / s_b)^-2`` and ``s_b`` is the count's sensitivity. Hence
        ``z_update = (z^-2 - (sigma_b / s_b)^-2)^(-1/2)``.

        Andrew et al. work with add/remove-one and centred bits, so ``s_b = 1/2``, which gives
        their ``(z^-2 - (2 sigma_b)^-2)^(-1/2)``. This module accounts under the replace-one bridge
        (module docstring), the same relation the aggregators' sensitivities use. Replacing a client
        can flip its bit, so ``s_b = 1`` and ``z_update = (z^-2 - sigma_b^-2)^(-1/2)``. That is the
        paper's formula with the count's sensitivity measured the same way as the aggregate's.

        Parameters
        ----------
        noise_multiplier : float
            ``z``, the multiplier the accountant is told.
        num_clients : int, optional
            Clients a round, needed when ``count_noise_multiplier`` is None (``sigma_b = n / 20``).

        Returns
        -------
        float
            ``z_update >= z``, to pass to :func:`central_noise_std`. ``0`` when ``z = 0`` (no DP).

        Raises
        ------
        DPConfigError
            If ``sigma_b <= z``. The count alone would then cost more than the whole budget.
        """
        z = _check_noise_multiplier(noise_multiplier, "AdaptiveClipper.effective_noise_multiplier")
        if z == 0.0:
            return 0.0
        if self.count_noise_multiplier is None and num_clients is None:
            raise DPConfigError(
                "AdaptiveClipper.effective_noise_multiplier: count_noise_multiplier is None (n/20), so "
                "num_clients is needed"
            )
        sigma_b = self.count_noise_std(num_clients if num_clients is not None else 1)
        if sigma_b <= z:
            raise DPConfigError(
                f"adaptive clipping: count noise multiplier sigma_b={sigma_b:g} must exceed the noise multiplier "
                f"z={z:g}, or the clipped-count release alone exceeds the privacy budget; set "
                f"count_noise_multiplier to several times z (sigma_b = 5z raises the update noise by 2%), "
                f"use more clients a round, or use a fixed clip norm"
            )
        return (z**-2 - sigma_b**-2) ** -0.5

    def state_dict(self) -> dict:
        """Everything needed to resume: configuration, clip norm, rounds and the noise generator state.

        Plain Python values only, so the dict can be written as JSON.
        """
        return {
            "initial_clip": self.initial_clip,
            "target_quantile": self.target_quantile,
            "learning_rate": self.learning_rate,
            "count_noise_multiplier": self.count_noise_multiplier,
            "clip_norm": self.clip_norm,
            "rounds": self.rounds,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`.

        The checkpoint restores state, not configuration. A checkpoint made with another target,
        learning rate or count noise is refused: resuming from it would change what the run means
        part-way through.
        """
        for key in ("target_quantile", "learning_rate", "count_noise_multiplier"):
            if key not in state:
                raise ValueError(f"AdaptiveClipper.load_state_dict: missing key {key!r}")
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"AdaptiveClipper.load_state_dict: checkpoint has {key}={state[key]!r}, "
                    f"this clipper has {getattr(self, key)!r}"
                )
        clip = _check_clip_norm(state["clip_norm"], "AdaptiveClipper.load_state_dict")
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        self.clip_norm = clip
        self.rounds = int(state["rounds"])
        self._rng = rng


# ----------------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------------


class _DropRdpConvergenceWarnings(logging.Filter):
    # dp_accounting logs a warning whenever a fractional RDP order fails to converge. It then drops
    # that order, which only loosens the bound a little, and does so on every call.
    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@contextlib.contextmanager
def _quiet_rdp_warnings() -> Iterator[None]:
    logger = logging.getLogger("absl")
    log_filter = _DropRdpConvergenceWarnings()
    logger.addFilter(log_filter)
    try:
        yield
    finally:
        logger.removeFilter(log_filter)


def _check_accounting_args(noise_multiplier: float, sampling_rate: float, delta: float, accountant: str, name: str):
    z = _check_noise_multiplier(noise_multiplier, name)
    q = float(sampling_rate)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"{name}: sampling_rate must be in (0, 1], got {sampling_rate}")
    d = float(delta)
    if not 0.0 < d < 1.0:
        raise ValueError(f"{name}: delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"{name}: accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return z, q, d


def _check_rounds(rounds: int, name: str) -> int:
    if isinstance(rounds, (int, np.integer)) and not isinstance(rounds, bool) and rounds >= 0:
        return int(rounds)
    raise ValueError(f"{name}: rounds must be an integer >= 0, got {rounds!r}")


def _epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float, accountant: str) -> float:
    # Arguments are already validated.
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    import dp_accounting  # deferred: the import takes ~1 s and only DP runs need it
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    round_event = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    event = dp_accounting.SelfComposedDpEvent(round_event, rounds)
    if accountant == "rdp":
        ledger = RdpAccountant()
    else:
        ledger = PLDAccountant(value_discretization_interval=_PLD_DISCRETIZATION)
    with _quiet_rdp_warnings():
        ledger.compose(event)
        return float(ledger.get_epsilon(delta))


def epsilon_for(
    noise_multiplier: float, sampling_rate: float, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """``epsilon`` of ``rounds`` Poisson-subsampled Gaussian mechanisms at ``delta``.

    Parameters
    ----------
    noise_multiplier : float
        ``z = noise std / sensitivity``, ``>= 0``. ``0`` gives ``inf`` after any round.
    sampling_rate : float
        ``q`` in ``(0, 1]``. For ``dp=central``, clients per round over total clients. For
        ``dp=client``, ``1``, with ``rounds`` being the rounds this client took part in.
    rounds : int
        Compositions, ``>= 0``. ``0`` gives ``0.0``.
    delta : float
        In ``(0, 1)``. Usually well below ``1 / N`` for ``N`` clients.
    accountant : {"rdp", "pld"}
        ``"rdp"``: Renyi DP with dp_accounting's default orders, the accountant Flower uses.
        ``"pld"``: privacy-loss distributions, tighter (often 5-15% smaller) and slower.
    """
    z, q, d = _check_accounting_args(noise_multiplier, sampling_rate, delta, accountant, "epsilon_for")
    return _epsilon(z, q, _check_rounds(rounds, "epsilon_for"), d, accountant)


class PrivacyAccountant:
    """Running ``(epsilon, delta)`` of a training run: one subsampled Gaussian mechanism a round.

    What ``epsilon`` means depends on the mode (see the module docstring):

    ``dp=central``
        ``sampling_rate = clients per round / total clients``. Call :meth:`step` once a round. ``epsilon``
        is user-level DP of the released global models.
    ``dp=client``
        Keep one accountant per client with ``sampling_rate = 1``, and step it in the rounds that
        client took part in. ``epsilon`` is that client's local DP: how well its released noisy updates
        hide its data.

    Parameters
    ----------
    noise_multiplier : float
        ``z >= 0``, the multiplier the run was asked for. With adaptive clipping this is the total,
        not :meth:`AdaptiveClipper.effective_noise_multiplier`.
    sampling_rate : float
        ``q`` in ``(0, 1]``.
    delta : float
        In ``(0, 1)``.
    accountant : {"rdp", "pld"}
        See :func:`epsilon_for`.
    """

    def __init__(self, *, noise_multiplier: float, sampling_rate: float, delta: float, accountant: str = "rdp") -> None:
        z, q, d = _check_accounting_args(noise_multiplier, sampling_rate, delta, accountant, "PrivacyAccountant")
        self.noise_multiplier = z
        self.sampling_rate = q
        self.delta = d
        self.accountant = accountant
        self.rounds = 0
        self._cache: dict[int, float] = {}

    def step(self, rounds: int = 1) -> None:
        """Record ``rounds`` more releases."""
        self.rounds += _check_rounds(rounds, "PrivacyAccountant.step")

    def epsilon(self) -> float:
        """``epsilon`` at :attr:`delta` after the rounds so far (``0.0`` before any)."""
        return self._epsilon_after(self.rounds)

    def epsilon_if_step(self, rounds: int = 1) -> float:
        """``epsilon`` after ``rounds`` more. Use it to stop before a target epsilon is crossed."""
        return self._epsilon_after(self.rounds + _check_rounds(rounds, "PrivacyAccountant.epsilon_if_step"))

    def _epsilon_after(self, rounds: int) -> float:
        if rounds not in self._cache:
            self._cache[rounds] = _epsilon(
                self.noise_multiplier, self.sampling_rate, rounds, self.delta, self.accountant
            )
        return self._cache[rounds]

    def state_dict(self) -> dict:
        """Configuration and rounds, as plain Python values."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "delta": self.delta,
            "accountant": self.accountant,
            "rounds": self.rounds,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume the round count from :meth:`state_dict`.

        A checkpoint with another noise multiplier, sampling rate, delta or accountant is refused.
        The rounds already spent were paid for at the old parameters, so continuing under the new ones
        would report a wrong epsilon.
        """
        for key in ("noise_multiplier", "sampling_rate", "delta", "accountant"):
            if key not in state:
                raise ValueError(f"PrivacyAccountant.load_state_dict: missing key {key!r}")
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"PrivacyAccountant.load_state_dict: checkpoint has {key}={state[key]!r}, "
                    f"this accountant has {getattr(self, key)!r}"
                )
        self.rounds = _check_rounds(state.get("rounds"), "PrivacyAccountant.load_state_dict")
