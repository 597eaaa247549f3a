"""When `raymoe serve` lets the ingress replica listen on serve.port itself (raymoe.serve.direct), and
the clear error for a port already taken. The server-level checks are in test_serve_errors.py."""

import socket

import pytest

from raymoe.config import parse_config
from raymoe.errors import ConfigError
from raymoe.serve.direct import check_port_free, direct_env, free_port, use_direct_http


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
