"""Phalanx on Flower's deployment runtime: real processes, TLS and SuperNode authentication on 127.0.0.1.

Specification:
- the throwaway CA signs a server certificate that verifies for 127.0.0.1 and localhost only;
  SuperNode keys are P-384 EC key pairs that Flower's own key loader accepts;
- a deployment of 2 registered SuperNodes runs 2 rounds of the app with ``flwr run``; every round
  accepts exactly the node ids the SuperLink assigned when the keys were registered;
- a SuperNode with an unregistered key is refused, and the SuperLink's refusal names its key;
- node ids are bound to keys: a restarted SuperNode and a restarted SuperLink keep them;
- nothing is left running afterwards, also when a step fails.

The deployment tests start real processes (1.5 to 2.5 minutes in all on 2 busy cores).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from server.deployment import (
    DeploymentError,
    LocalDeployment,
    NodeKey,
    Supervisor,
    check_summary,
    flower_processes,
    free_ports,
    main,
    make_node_key,
    make_tls_files,
    public_key_pem,
    run_config_toml,
    run_local_deployment,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: flwr depends on tomli
    import tomli as tomllib


# --------------------------------------------------------------------------- key material


def _server_verifier(ca_cert: Path, name: x509.GeneralName):
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    store = verification.Store([ca])
    builder = verification.PolicyBuilder().store(store)
    if isinstance(name, x509.IPAddress):
        return builder.build_server_verifier(name)
    return builder.build_server_verifier(x509.DNSName(name.value))


@pytest.mark.parametrize("name", [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
def test_server_certificate_verifies_against_the_ca_for_loopback(tmp_path, name):
    tls = make_tls_files(tmp_path)
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    chain = _server_verifier(tls.ca_cert, name).verify(server, [])
    assert chain[0] == server and len(chain) == 2


def test_server_certificate_is_refused_for_another_host_and_by_another_ca(tmp_path):
    tls = make_tls_files(tmp_path / "a")
    other = make_tls_files(tmp_path / "b")
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    with pytest.raises(verification.VerificationError):
        _server_verifier(tls.ca_cert, x509.DNSName("example.com")).verify(server, [])
    with pytest.raises(verification.VerificationError):
        _server_verifier(other.ca_cert, x509.DNSName("localhost")).verify(server, [])


def test_server_key_matches_its_certificate_and_only_the_owner_can_read_it(tmp_path):
    tls = make_tls_files(tmp_path)
    key = serialization.load_pem_private_key(tls.server_key.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert tls.server_key.stat().st_mode & 0o777 == 0o600


def test_node_key_is_a_p384_pair_that_flower_accepts(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    pair = make_node_key(tmp_path, "hospital-a")
    private = serialization.load_ssh_private_key(pair.private_key.read_bytes(), None)
    public = serialization.load_ssh_public_key(pair.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert pair.private_key.stat().st_mode & 0o777 == 0o600
    # What `flwr supernode register` sends the SuperLink, and what the SuperLink logs on a refusal.
    assert try_load_public_key(pair.public_key).decode() == public_key_pem(pair)


@pytest.mark.parametrize("name", ["", "../x", "a b", "-x"])
def test_node_key_name_must_be_a_plain_file_name(tmp_path, name):
    with pytest.raises(ValueError, match="name"):
        make_node_key(tmp_path, name)


# --------------------------------------------------------------------------- secrets and directory modes


def _mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o7777


def test_a_symlink_planted_at_the_server_key_is_replaced_not_followed(tmp_path):
    # Issue 14, item 10: key files were written through a symlink and kept a pre-existing mode.
    victim = tmp_path / "victim"
    victim.write_text("precious")
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    (tls_dir / "server.key").symlink_to(victim)
    (tls_dir / "ca.crt").symlink_to(victim)
    tls = make_tls_files(tls_dir)
    assert victim.read_text() == "precious"
    assert not tls.server_key.is_symlink() and _mode(tls.server_key) == 0o600
    assert not tls.ca_cert.is_symlink()
    serialization.load_pem_private_key(tls.server_key.read_bytes(), None)


def test_a_permissive_old_server_key_does_not_keep_its_mode(tmp_path):
    first = make_tls_files(tmp_path / "tls")
    first.server_key.chmod(0o644)
    again = make_tls_files(tmp_path / "tls")
    assert _mode(again.server_key) == 0o600 and _mode(tmp_path / "tls") == 0o700


def test_node_keys_are_never_overwritten_nor_written_through_a_symlink(tmp_path):
    pair = make_node_key(tmp_path / "keys", "owner")
    assert _mode(tmp_path / "keys") == 0o700
    before = pair.private_key.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite a node key"):
        make_node_key(tmp_path / "keys", "owner")
    assert pair.private_key.read_bytes() == before
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "keys" / "planted").symlink_to(victim)
    with pytest.raises(FileExistsError):
        make_node_key(tmp_path / "keys", "planted")
    replaced = make_node_key(tmp_path / "keys", "planted", overwrite=True)  # throwaway keys of a local deployment
    assert victim.read_text() == "precious" and _mode(replaced.private_key) == 0o600
    assert main(["node-key", "owner", "--out", str(tmp_path / "keys")]) == 1


def test_the_work_dir_and_superlink_state_are_private(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    workdir.chmod(0o755)
    deployment = LocalDeployment(workdir)  # starts nothing until start_superlink
    for path in (workdir, workdir / "superlink", workdir / "flwr-home", workdir / "logs", workdir / "keys",
                 workdir / "tls"):
        assert _mode(path) == 0o700, path
    assert _mode(deployment.tls.server_key) == 0o600
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "superlink").symlink_to(tmp_path / "attacker", target_is_directory=True)
    (tmp_path / "attacker").mkdir()
    with pytest.raises(OSError, match="superlink is a symlink"):
        LocalDeployment(tmp_path / "elsewhere")


# --------------------------------------------------------------------------- ports, config, checks


def test_free_ports_are_distinct_and_bindable():
    import socket

    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_run_config_toml_is_what_flower_parses(tmp_path):
    from flwr.common.config import parse_config_args

    config = {"num-clients": 2, "attack": "none", "lr": 0.3, "delta": 1e-5, "resume": False,
              "out": str(tmp_path / "it's a \"dir\" with spaces")}
    path = tmp_path / "run-config.toml"
    path.write_text(run_config_toml(config))
    assert tomllib.loads(path.read_text()) == config
    assert parse_config_args([str(path)]) == config


@pytest.mark.parametrize("config, message", [({"Num_Clients": 2}, "dash-case"), ({"rounds": [1, 2]}, "list"),
                                             ({"rounds": None}, "NoneType")])
def test_run_config_toml_refuses_bad_keys_and_values(config, message):
    with pytest.raises(ValueError, match=message):
        run_config_toml(config)


def test_check_summary_requires_every_round_to_accept_exactly_the_registered_nodes():
    good = {"rounds": [{"round": 1, "accepted": [7, 9]}, {"round": 2, "accepted": [9, 7]}]}
    check_summary(good, 2, [9, 7])
    with pytest.raises(DeploymentError, match="rounds"):
        check_summary(good, 3, [7, 9])
    intruder = {"rounds": [{"round": 1, "accepted": [7, 9, 13]}]}
    with pytest.raises(DeploymentError, match="round 1 accepted"):
        check_summary(intruder, 1, [7, 9])


# --------------------------------------------------------------------------- process supervision


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_supervisor_stops_a_detached_grandchild_and_kills_what_ignores_sigterm(tmp_path):
    # A parent that starts a child in a session of its own (as flower-superlink starts its SuperExec)
    # and ignores SIGTERM: stop() must find the child through the tree and SIGKILL the parent.
    script = ("import signal, subprocess, sys, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
              "                         start_new_session=True)\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(120)\n")
    supervisor = Supervisor(grace=0.5)
    log = tmp_path / "parent.log"
    parent = supervisor.spawn([sys.executable, "-c", script], log, os.environ)
    child = int(_wait_for_line(log).split()[0])
    assert _alive(parent.pid) and _alive(child)
    supervisor.stop()
    assert parent.returncode == -signal.SIGKILL
    assert not _alive(child)


def _wait_for_line(path: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.read_text().strip()


def test_process_markers_match_whole_paths_and_addresses_only(tmp_path):
    # A process that looks like another deployment's SuperLink: its dir and port extend ours.
    other_dir = tmp_path / "dep2"
    supervisor = Supervisor(grace=1.0)
    supervisor.spawn([sys.executable, "-c", "import time; time.sleep(60)", "flower-superlink",
                      f"{other_dir}/tls/ca.crt", "127.0.0.1:46135"], tmp_path / "fake.log", os.environ)
    try:
        assert flower_processes([str(tmp_path / "dep"), "127.0.0.1:4613"]) == []
        assert len(flower_processes([str(other_dir)])) == 1
        assert len(flower_processes(["127.0.0.1:46135"])) == 1
    finally:
        supervisor.stop()
    assert flower_processes([str(other_dir)]) == []


def test_started_processes_get_sigterm_when_their_starter_is_killed(tmp_path):
    # SIGKILL skips every finally and atexit handler: the kernel's parent-death signal still stops the child.
    script = ("import os, sys, time\n"
              "from pathlib import Path\n"
              "from server.deployment import Supervisor\n"
              "child = Supervisor().spawn([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
              "                           Path(sys.argv[1]), os.environ)\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(120)\n")
    starter = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "child.log")], stdout=subprocess.PIPE,
                               text=True, cwd=Path(__file__).resolve().parents[1])
    child = int(starter.stdout.readline())
    assert _alive(child)
    starter.kill()
    starter.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


# --------------------------------------------------------------------------- real deployments


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One full deployment: 2 registered SuperNodes, 1 unregistered, 2 rounds (about 80 s)."""
    return run_local_deployment(tmp_path_factory.mktemp("deployment"), num_nodes=2, rounds=2)


def test_two_rounds_accept_exactly_the_registered_nodes(report):
    registered = sorted(report.node_ids.values())
    assert len(set(registered)) == 2
    assert [r["round"] for r in report.summary["rounds"]] == [1, 2]
    for record in report.summary["rounds"]:
        assert sorted(record["accepted"]) == registered
        assert record["rejected"] == {}
    assert report.summary["config"]["num-clients"] == 2
    assert (report.run_dir / "audit.jsonl").is_file()


def test_the_run_learns_across_processes(report):
    # Digits with 2 IID clients: the first round of FedAvg is well above chance (0.1).
    assert report.summary["rounds"][0]["accuracy"] > 0.5


def test_an_unregistered_supernode_is_refused(report):
    refused = report.refused
    assert refused is not None
    assert refused.exit_status != 0
    assert refused.flower_exit_code == 305  # SUPERNODE_CONNECTION_ERROR: activation refused
    intruder = NodeKey(report.workdir / "keys" / "unregistered", report.workdir / "keys" / "unregistered.pub")
    intruder_key = public_key_pem(intruder).splitlines()[1]
    assert intruder_key in refused.superlink_evidence
    accepted = {n for r in report.summary["rounds"] for n in r["accepted"]}
    assert accepted == set(report.node_ids.values())


def test_nothing_is_left_running_after_the_deployment(report):
    assert any(str(report.workdir) in m for m in report.markers)
    assert len(report.markers) >= 4  # the work dir, the SuperLink and one Runtime API port per SuperNode
    assert flower_processes(report.markers) == []


def test_node_ids_survive_restarts_and_everything_stops_on_error(tmp_path):
    deployment = LocalDeployment(tmp_path)
    with pytest.raises(DeploymentError, match="was accepted"):
        with deployment:
            key = make_node_key(tmp_path / "keys", "owner")
            deployment.start_superlink()
            node_id = deployment.register(key)
            deployment.start_supernode("owner", key, {"partition-id": 0, "num-partitions": 1})
            assert deployment.wait_for_node_id("owner") == node_id

            # The check below is meaningful: it sees this deployment's processes while they run.
            running = " ".join(p.cmdline for p in flower_processes(deployment.markers))
            for name in ("flower-superlink", "flower-supernode", "flower-superexec"):
                assert name in running

            # A data owner restarts its SuperNode with the same key: same node id.
            deployment.supernodes["owner"].send_signal(signal.SIGTERM)
            deployment.supernodes["owner"].wait(timeout=30)
            deployment.start_supernode("owner", key, {"partition-id": 0, "num-partitions": 1})
            assert deployment.wait_for_node_id("owner") == node_id

            # The SuperLink restarts on its database: the registration, so the node id, survives.
            deployment.stop_superlink()
            deployment.start_superlink()
            assert node_id in deployment.list_nodes()

            # A run the app refuses (unknown run-config key) is reported by flwr run's exit status.
            assert deployment.run({"no-such-key": 1}, timeout=120) != 0
            assert "Invalid run configuration" in deployment.log("flwr-run").read_text()

            # A registered node is not refused: the refusal check fails, and raises inside the block.
            deployment.wait_for_refusal("owner")
    assert flower_processes(deployment.markers) == []
    assert all(p.poll() is not None for p in deployment.supervisor.processes)


def test_cli_writes_a_node_key_and_refuses_bad_arguments(tmp_path, capsys):
    assert main(["node-key", "hospital-a", "--out", str(tmp_path)]) == 0
    assert "flwr supernode register" in capsys.readouterr().out
    assert (tmp_path / "hospital-a").is_file() and (tmp_path / "hospital-a.pub").is_file()
    assert main(["local", "--nodes", "0", "--workdir", str(tmp_path / "dep")]) == 1
    assert "num_nodes and rounds must be >= 1" in capsys.readouterr().err
    assert main(["local", "--workdir", str(tmp_path / "dep"), "--set", "aggregator"]) == 1
    assert "expected KEY=VALUE" in capsys.readouterr().err
