"""A federation on a running Ray cluster through Flower's simulation engine (docs/scaling.md).

Specification: with ``ray_address`` the Ray engine joins a cluster started by ``ray start --head``
instead of starting Ray itself, its clients run as actors of that cluster (their worker logs
appear in the cluster's session), the per-round numbers equal the in-process engine's, and the
cluster is gone after its context. Skipped where the ``ray`` command is missing.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from simulations.harness import local_ray_cluster, run_federation

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
CONFIG = {"num-clients": 4, "num-malicious": 1, "num-byzantine": 1, "rounds": 2, "aggregator": "median",
          "attack": "sign-flip"}


@pytest.mark.skipif(not Path(RAY).exists(), reason="the ray command (flwr[simulation]) is not installed")
def test_a_federation_runs_on_a_started_ray_cluster_and_equals_the_inprocess_engine(tmp_path):
    import ray

    with local_ray_cluster(num_cpus=2) as cluster:
        summary = run_federation(CONFIG | {"out": str(tmp_path / "cluster")}, engine="ray",
                                 ray_address=cluster.address)
        assert not ray.is_initialized()  # the driver left the cluster; the cluster kept running
        assert list(cluster.session_dir.glob("logs/worker-*.out")), "no client actor ran on the cluster"
    assert summary["engine"] == {"name": "ray", "ray_address": cluster.address}
    assert not cluster.temp_dir.exists()  # stopped and cleaned up
    inprocess = run_federation(CONFIG | {"out": str(tmp_path / "inprocess")})
    assert [r["accuracy"] for r in summary["rounds"]] == [r["accuracy"] for r in inprocess["rounds"]]
