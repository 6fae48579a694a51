"""Which partitions (clients) are the attackers of a simulated run."""

from __future__ import annotations

import numpy as np

#: Mixed into the seed so that the attacker draw is independent of other draws seeded by the run's
#: seed (data partitioning, client sampling), which would otherwise share its random stream.
_STREAM_TAG = 0xA77AC4


def malicious_partitions(num_clients: int, num_malicious: int, seed: int) -> list[int]:
    """Draw the partition ids of the attackers, uniformly without replacement.

    Parameters
    ----------
    num_clients : int
        Number of partitions (clients), >= 1.
    num_malicious : int
        Number of attackers, ``0 <= num_malicious <= num_clients``.
    seed : int
        The run's seed: the same seed gives the same attackers in the server and every client.

    Returns
    -------
    list[int]
        Sorted partition ids in ``[0, num_clients)``.

    Raises
    ------
    ValueError
        If a count is not an int or is out of range.
    """
    for label, value in (("num_clients", num_clients), ("num_malicious", num_malicious), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"malicious_partitions: {label} must be an int, got {value!r}")
    if num_clients < 1:
        raise ValueError(f"malicious_partitions: num_clients must be >= 1, got {num_clients}")
    if not 0 <= num_malicious <= num_clients:
        raise ValueError(
            f"malicious_partitions: num_malicious must lie in [0, num_clients={num_clients}], got {num_malicious}"
        )
    if seed < 0:
        raise ValueError(f"malicious_partitions: seed must be >= 0, got {seed}")
    rng = np.random.default_rng([int(seed), _STREAM_TAG])
    return sorted(int(p) for p in rng.choice(num_clients, size=num_malicious, replace=False))
