"""Client reputation across rounds, and what the server does about suspicious clients.

A node's *reputation* is an exponential moving average of its per-round combined anomaly score
(:mod:`server.scoring`): higher is worse, always in ``[0, 1]``. Every node starts at 0 (no
evidence against it), and each round it takes part in::

    reputation = decay * reputation + (1 - decay) * combined

so with the default ``decay = 0.5`` one round at score 0.9 gives 0.45 and a second gives 0.675.
Rounds a node does not take part in leave its reputation unchanged.

A node is **flagged** in a round when its combined score that round is ``>= threshold`` or
its reputation (after this round's update) is ``>= threshold``: the first catches a single
blatant round, the second a node that keeps scoring high without crossing the threshold in
one round (a reputation can only reach the threshold through repeated high scores).

Policies (what the strategy does with flags):

``flag``
    Record and report only; every update is aggregated.
``exclude``
    Drop the updates of the nodes flagged this round before aggregating.
``quarantine``
    Tolerate ``quarantine_after - 1`` flags; the ``quarantine_after``-th flag within
    ``strike_window`` rounds (counted since the node's last quarantine ended) drops that round's
    update and keeps the node out of the next ``quarantine_rounds`` rounds (not sampled). After
    that the node is back on probation with no flags counted (its reputation is kept).

    Why a window: under label skew a few honest clients are flagged now and then, a round here
    and a round ten rounds later (``benchmarks/false_flags.py``). Counted over the whole run,
    two such flags quarantined them; an attacker worth quarantining is flagged round after
    round and still reaches ``quarantine_after`` flags in as many rounds.
``trust-weighted``
    Every update is aggregated with its weight multiplied by ``1 - reputation``.

Independently of the policy, the server can put a node in quarantine itself
(:meth:`Reputation.force_quarantine`): a rollback does so for the nodes flagged in the rounds
it undoes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

POLICIES = ("flag", "exclude", "quarantine", "trust-weighted")

#: Version of the ``state_dict`` layout (1: strikes were counts, without their rounds).
STATE_FORMAT = 2
#: Default number of recent rounds within which flags count toward a quarantine.
DEFAULT_STRIKE_WINDOW = 5


class Reputation:
    """Per-node reputation, flags and quarantine under one policy.

    Parameters
    ----------
    policy : str
        One of :data:`POLICIES`.
    decay : float
        Weight of the previous reputation in the moving average, in ``[0, 1)``; 0 means the
        reputation is just the latest score.
    threshold : float
        Flag threshold on the combined score and on the reputation, in ``(0, 1]``.
    quarantine_after : int
        Flags (since the last release) that put a node in quarantine; >= 1.
    quarantine_rounds : int
        Rounds a quarantined node is kept out after the round that triggered it; >= 1.
    strike_window : int | None
        Flags count toward a quarantine for this many rounds: a flag in round r counts until
        round r + strike_window - 1; >= 1, or None to count every flag since the last release.

    Raises
    ------
    ValueError
        On an unknown policy or a parameter out of range (the message names it).
    """

    def __init__(self, policy: str = "flag", *, decay: float = 0.5, threshold: float = 0.5,
                 quarantine_after: int = 2, quarantine_rounds: int = 3,
                 strike_window: int | None = DEFAULT_STRIKE_WINDOW) -> None:
        if policy not in POLICIES:
            raise ValueError(f"reputation policy must be one of {POLICIES}, got {policy!r}")
        if not (isinstance(decay, (int, float)) and 0.0 <= decay < 1.0):
            raise ValueError(f"reputation decay must be in [0, 1), got {decay!r}")
        if not (isinstance(threshold, (int, float)) and 0.0 < threshold <= 1.0):
            raise ValueError(f"flag threshold must be in (0, 1], got {threshold!r}")
        if not (isinstance(quarantine_after, int) and quarantine_after >= 1):
            raise ValueError(f"quarantine_after must be an integer >= 1, got {quarantine_after!r}")
        if not (isinstance(quarantine_rounds, int) and quarantine_rounds >= 1):
            raise ValueError(f"quarantine_rounds must be an integer >= 1, got {quarantine_rounds!r}")
        if strike_window is not None and not (isinstance(strike_window, int) and strike_window >= 1):
            raise ValueError(f"strike_window must be an integer >= 1 or None, got {strike_window!r}")
        self.policy = policy
        self.decay = float(decay)
        self.threshold = float(threshold)
        self.quarantine_after = quarantine_after
        self.quarantine_rounds = quarantine_rounds
        self.strike_window = strike_window
        self._reputation: dict[int, float] = {}
        self._flags: dict[int, int] = {}
        # Rounds of the flags since the node's last release that still count (what triggers the next one).
        self._strikes: dict[int, list[int]] = {}
        # node -> (first, last) round of its current or latest quarantine, inclusive.
        self._quarantine: dict[int, tuple[int, int]] = {}
        # node -> (first, last) round of a quarantine the server imposed (rollback), any policy.
        self._forced: dict[int, tuple[int, int]] = {}
        self._last_round: int | None = None

    # ------------------------------------------------------------------------------------ views
    @property
    def reputations(self) -> dict[int, float]:
        """Reputation of every node seen so far (a copy)."""
        return dict(self._reputation)

    @property
    def flag_counts(self) -> dict[int, int]:
        """Number of rounds each node was flagged in, over the whole run (nodes never flagged are absent)."""
        return dict(self._flags)

    @property
    def quarantines(self) -> dict[int, tuple[int, int]]:
        """Each quarantined node's latest quarantine as ``(first round, last round)``, inclusive."""
        return dict(self._quarantine)

    # ---------------------------------------------------------------------------------- updates
    def observe(self, server_round: int, node_ids: list[int], combined: list[float] | torch.Tensor) -> list[int]:
        """Fold one round's combined scores into the reputations; return the nodes flagged.

        Also counts the flags and records a quarantine when a node's flags since its last
        release reach ``quarantine_after``. That bookkeeping runs under every policy (visible in
        :attr:`quarantines`, e.g. for a report of what quarantine would have done), but only the
        ``quarantine`` policy acts on it through :meth:`is_quarantined` and :meth:`excluded`.

        Parameters
        ----------
        server_round : int
            The round; must not be earlier than the last observed one.
        node_ids : list[int]
            The scored nodes, no duplicates.
        combined : list[float] | torch.Tensor
            Their combined scores, in ``[0, 1]``, same order.

        Returns
        -------
        list[int]
            Flagged node ids this round, in the order of ``node_ids``.

        Raises
        ------
        ValueError
            On a round earlier than the last one, duplicate ids, mismatched lengths or a score
            outside ``[0, 1]`` (the message names the node).
        """
        nodes, scores = self._checked(node_ids, combined)
        if self._last_round is not None and server_round < self._last_round:
            raise ValueError(f"reputation: round {server_round} observed after round {self._last_round}")
        self._last_round = int(server_round)
        flagged: list[int] = []
        for node, score in zip(nodes, scores):
            previous = self._reputation.get(node, 0.0)
            reputation = min(1.0, max(0.0, self.decay * previous + (1.0 - self.decay) * score))
            self._reputation[node] = reputation
            if score >= self.threshold or reputation >= self.threshold:
                flagged.append(node)
                self._flags[node] = self._flags.get(node, 0) + 1
                self._strike(node, server_round)
        return flagged

    def _strike(self, node: int, server_round: int) -> None:
        window = self._quarantine.get(node)
        if window is not None and window[0] <= server_round <= window[1]:
            return  # already in quarantine: a flag now does not extend it
        strikes = self._strikes.get(node, []) + [int(server_round)]
        if self.strike_window is not None:
            strikes = [r for r in strikes if r > server_round - self.strike_window]
        if len(strikes) >= self.quarantine_after:
            self._quarantine[node] = (int(server_round), int(server_round) + self.quarantine_rounds)
            strikes = []
        self._strikes[node] = strikes

    def force_quarantine(self, node_id: int, first_round: int, last_round: int) -> None:
        """Keep a node out of rounds ``first_round`` .. ``last_round`` under any policy (a rollback's verdict)."""
        if last_round < first_round:
            raise ValueError(f"quarantine of node {node_id}: last round {last_round} before first {first_round}")
        node = int(node_id)
        current = self._forced.get(node)
        if current is not None and current[1] >= first_round:
            first_round = min(first_round, current[0])
            last_round = max(last_round, current[1])
        self._forced[node] = (int(first_round), int(last_round))

    # ----------------------------------------------------------------------------------- policy
    def is_quarantined(self, node_id: int, server_round: int) -> bool:
        """Whether the node is in quarantine in this round.

        A quarantine triggered in round r covers rounds r (its update is dropped) through
        r + ``quarantine_rounds`` (not sampled); the node is back from round r + K + 1. Policy
        quarantines count only under the ``quarantine`` policy; forced ones
        (:meth:`force_quarantine`) under every policy.
        """
        forced = self._forced.get(int(node_id))
        if forced is not None and forced[0] <= server_round <= forced[1]:
            return True
        if self.policy != "quarantine":
            return False
        window = self._quarantine.get(int(node_id))
        return window is not None and window[0] <= server_round <= window[1]

    def excluded(self, server_round: int, node_ids: Iterable[int], combined: list[float] | torch.Tensor) -> set[int]:
        """Ids whose update the strategy must drop this round.

        ``exclude``: the nodes flagged by the current state, i.e. combined score or reputation
        ``>= threshold`` (called after :meth:`observe` for the same round, exactly the nodes
        ``observe`` flagged). ``quarantine``: the listed nodes in quarantine this round.
        ``flag`` and ``trust-weighted``: empty. Changes no state.

        Raises
        ------
        ValueError
            On mismatched lengths, duplicates or scores outside ``[0, 1]``.
        """
        nodes, scores = self._checked(list(node_ids), combined)
        if self.policy == "exclude":
            return {n for n, s in zip(nodes, scores)
                    if s >= self.threshold or self._reputation.get(n, 0.0) >= self.threshold}
        if self.policy == "quarantine":
            return {n for n in nodes if self.is_quarantined(n, server_round)}
        return {n for n in nodes if n in self._forced and self.is_quarantined(n, server_round)}

    def trust_weights(self, node_ids: list[int]) -> torch.Tensor:
        """``1 - reputation`` per node (1 for nodes never seen), float64 on the CPU.

        The ``trust-weighted`` policy multiplies the aggregation weights by these. A node whose
        reputation reaches 1 gets weight 0; when every weight is 0 the caller must fall back
        (e.g. to uniform weights).
        """
        return torch.tensor([1.0 - self._reputation.get(int(n), 0.0) for n in node_ids], dtype=torch.float64)

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """JSON-able state (node ids as string keys); settings are included for reference."""
        return {
            "format": STATE_FORMAT,
            "policy": self.policy,
            "decay": self.decay,
            "threshold": self.threshold,
            "quarantine_after": self.quarantine_after,
            "quarantine_rounds": self.quarantine_rounds,
            "strike_window": self.strike_window,
            "last_round": self._last_round,
            "reputation": {str(n): r for n, r in self._reputation.items()},
            "flags": {str(n): c for n, c in self._flags.items()},
            "strikes": {str(n): list(c) for n, c in self._strikes.items()},
            "quarantine": {str(n): [a, b] for n, (a, b) in self._quarantine.items()},
            "forced": {str(n): [a, b] for n, (a, b) in self._forced.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the per-node state saved by :meth:`state_dict`.

        The settings (policy, decay, threshold, quarantine parameters) stay those given to the
        constructor, so a resumed run follows its current configuration. A format-1 state (from
        before strikes kept their rounds) is read too: its strike counts are taken as flags of
        its last round, so they still count.

        Raises
        ------
        ValueError
            If the state is not of a known format or holds a malformed entry (naming it).
        """
        if not isinstance(state, dict) or state.get("format") not in (1, STATE_FORMAT):
            raise ValueError(f"reputation state: expected a dict with format {STATE_FORMAT}")
        try:
            reputation = {int(n): float(r) for n, r in state["reputation"].items()}
            flags = {int(n): int(c) for n, c in state["flags"].items()}
            if state["format"] == 1:
                last = 0 if state["last_round"] is None else int(state["last_round"])
                strikes = {int(n): [last] * int(c) for n, c in state["strikes"].items()}
            else:
                strikes = {int(n): [int(r) for r in c] for n, c in state["strikes"].items()}
            quarantine = {int(n): (int(w[0]), int(w[1])) for n, w in state["quarantine"].items()}
            forced = {int(n): (int(w[0]), int(w[1])) for n, w in state.get("forced", {}).items()}
            last_round = None if state["last_round"] is None else int(state["last_round"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise ValueError(f"reputation state: malformed entry ({error!r})") from None
        bad = [n for n, r in reputation.items() if not (math.isfinite(r) and 0.0 <= r <= 1.0)]
        if bad:
            raise ValueError(f"reputation state: reputation of nodes {bad} not in [0, 1]")
        self._reputation, self._flags, self._strikes = reputation, flags, strikes
        self._quarantine, self._last_round, self._forced = quarantine, last_round, forced

    # -------------------------------------------------------------------------------- helpers
    @staticmethod
    def _checked(node_ids: list[int], combined: list[float] | torch.Tensor) -> tuple[list[int], list[float]]:
        if isinstance(combined, torch.Tensor):
            combined = combined.detach().cpu().double().flatten().tolist()
        scores = [float(s) for s in combined]
        nodes = [int(n) for n in node_ids]
        if len(nodes) != len(scores):
            raise ValueError(f"reputation: {len(nodes)} node ids but {len(scores)} scores")
        if len(set(nodes)) != len(nodes):
            duplicates = sorted({n for n in nodes if nodes.count(n) > 1})
            raise ValueError(f"reputation: duplicate node ids {duplicates}")
        for node, score in zip(nodes, scores):
            if not (math.isfinite(score) and 0.0 <= score <= 1.0):
                raise ValueError(f"reputation: combined score of node {node} must be in [0, 1], got {score}")
        return nodes, scores
