"""When `raymoe serve` lets the ingress replica listen on serve.port itself (raymoe.serve.direct), and
the clear error for a port already taken; a replica, or its engine process, that dies is replaced
on the same port. The
checks on the shared server are in test_serve_errors.py."""

import contextlib
import os
import signal
import socket
import time

import httpx
import pytest
from serve_harness import API_KEY, CONFIG, MODEL, start_server, stop_server

from raymoe.config import parse_config
from raymoe.errors import ConfigError
from raymoe.serve.direct import bind_reusing_address, check_port_free, direct_env, free_port, use_direct_http


@pytest.mark.parametrize("data, own_cluster, expected", [
    ({}, True, True),  # the default: one engine replica holding the ingress, Ray of our own
    ({}, False, False),  # --address: Ray's environment is not ours to set
    ({"serve": {"direct_http": False}}, True, False),
    ({"decode": {"autoscaling": {"max_replicas": 2}}}, True, False),  # two replicas: the proxy spreads requests
    ({"serve": {"ingress_in_engine": False}, "decode": {"autoscaling": {"max_replicas": 2}}}, True, True),
    ({"serve": {"ingress_in_engine": False}, "ingress": {"autoscaling": {"max_replicas": 2}}}, True, False),
    ({"backend": "cluster"}, True, True),  # the cluster backend's ingress is one replica too
])  # fmt: skip
def test_direct_http_where_one_ingress_replica_holds_the_port(data, own_cluster, expected):
    assert use_direct_http(parse_config(data), own_cluster) is expected


def test_direct_http_said_on_a_joined_cluster_is_an_error():
    with pytest.raises(ConfigError, match="drop --address"):
        use_direct_http(parse_config({"serve": {"direct_http": True}}), own_cluster=False)


def test_the_port_range_is_the_one_port():
    env = direct_env(8123)
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == (
        "8123", "8124")  # Serve allocates from range(min, max)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1" and env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"


def test_a_taken_port_is_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve on 127.0.0.1:{port}: .*pass a free --port"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", free_port("127.0.0.1"))  # free: no error


def _port_with_a_lingering_connection() -> tuple[int, socket.socket]:
    """A port whose listener closed after closing an accepted connection first (FIN-WAIT-2, as a dead
    replica's connections are), and the client end that keeps it so."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()
    listener.close()
    return port, client


def test_serve_binds_where_only_a_dead_replicas_connections_linger(monkeypatch):
    from ray.serve._private import http_util

    monkeypatch.setattr(http_util, "socket", http_util.socket)  # restored after the test
    monkeypatch.delenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", raising=False)
    assert not bind_reusing_address() and http_util.socket is socket  # not direct ingress: Serve's as it was
    monkeypatch.setenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
    assert bind_reusing_address() and bind_reusing_address()  # twice: still one wrapper
    port, client = _port_with_a_lingering_connection()
    with client, socket.socket() as plain, http_util.socket.socket(socket.AF_INET, socket.SOCK_STREAM) as served:
        with pytest.raises(OSError, match="in use"):
            plain.bind(("127.0.0.1", port))  # how Ray Serve 2.60 binds by itself
        served.bind(("127.0.0.1", port))
        served.listen()
        with socket.socket() as rival, pytest.raises(OSError, match="in use"):
            rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            rival.bind(("127.0.0.1", port))  # a port still listening stays taken


def _descendants(server) -> dict[int, str]:
    """pid -> command line of every process under the `raymoe serve` process (Ray's workers are under
    the raylet it started), read from /proc."""
    parents, cmdlines = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            parents[int(pid)] = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            cmdlines[int(pid)] = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    mine, grew = {server.process.pid}, True
    while grew:
        found = {pid for pid, parent in parents.items() if parent in mine} - mine
        mine, grew = mine | found, bool(found)
    return {pid: cmdlines.get(pid, "") for pid in mine}


def _one(server, marker: str) -> int:
    pids = [pid for pid, cmdline in _descendants(server).items() if marker in cmdline]
    assert len(pids) == 1, f"processes with {marker!r} under the server: {pids}\n{server.log()}"
    return pids[0]


REPLICA, ENGINE = "ServeReplica:raymoe:engine", "raymoe.serve.engine_process"
REPLACED_WITHIN_S = 60  # ~10-20 s here; with Serve's default port quarantine (~2 min) it would not be,
# nor where the dead replica's open connections kept the port (FIN-WAIT-2, a minute) from the new one


@pytest.mark.timeout(300)
@pytest.mark.parametrize("victim", [REPLICA, ENGINE])
def test_a_replica_or_its_engine_that_dies_is_replaced_on_the_same_port(tmp_path, victim):
    """The replica listening on serve.port, or the engine process it started, dies (SIGKILL) while a
    client holds a keep-alive connection to it: Serve replaces the replica (its health check fails when
    the engine process is gone), the new one takes the port back at once (no port quarantine; the
    lingering connection does not block its bind), and the server answers there again, greedy as before."""
    server = start_server(tmp_path, CONFIG)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
    try:
        assert server.direct
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as held:
            before = held.post("/v1/completions", json=body).json()  # its connection stays open in the pool
            old_replica = _one(server, REPLICA)
            os.kill(_one(server, victim), signal.SIGKILL)
            deadline, reply = time.monotonic() + REPLACED_WITHIN_S, None
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    reply = httpx.post(f"{server.base_url}/v1/completions", json=body, headers=headers, timeout=60)
                    if reply.status_code == 200 and _one(server, REPLICA) != old_replica:
                        break
                time.sleep(1)
        assert reply is not None and reply.status_code == 200, server.log()
        assert _one(server, REPLICA) != old_replica
        assert reply.json()["choices"][0]["text"] == before["choices"][0]["text"]
    finally:
        assert stop_server(server) == 0, server.log()
