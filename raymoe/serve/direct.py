"""Direct HTTP: the ingress replica listens on serve.port itself (`serve.direct_http`).

By default Ray Serve puts an HTTP proxy process in front of every ingress replica: each request and
each streamed chunk crosses from the proxy to the replica and back over Ray's RPC. Ray Serve's
direct ingress (`RAY_SERVE_ENABLE_DIRECT_INGRESS`) lets the ingress replica run the HTTP server
itself, on a port Serve allocates from a range. `raymoe serve` turns it on where that range can be
just serve.port: in a Ray cluster of its own (the settings must be in the environment before Ray
starts: every Serve process reads them at import) and with one ingress replica (a second would get
another port). Serve still starts its proxy; it is moved to a free port of its own, unused.

Serve answers `/-/healthz` on that port before admission; `/health` is the ingress's own route there,
and waits for a slot like every route once all of the replica's `max_ongoing_requests` are taken.

Ray Serve 2.60 binds the replica's socket without SO_REUSEADDR (ray-project/ray#60615). A replica
that dies with client connections open leaves them in FIN-WAIT-2 or TIME-WAIT on serve.port for a
minute; its replacement's bind fails, Serve blocks the port, and the server is down that minute.
`bind_reusing_address` gives the sockets Serve's HTTP helper creates SO_REUSEADDR, as uvicorn's own
have: a port with only lingering connections binds at once, one still listening does not.
"""

from __future__ import annotations

import os
import socket
import types

from raymoe.config import RaymoeConfig
from raymoe.errors import ConfigError


def ingress_replicas(config: RaymoeConfig) -> int:
    """The most replicas the deployment holding the HTTP ingress may have."""
    return getattr(config, config.ingress_section).autoscaling.max_replicas


def use_direct_http(config: RaymoeConfig, own_cluster: bool) -> bool:
    """serve.direct_http resolved for a start; `own_cluster`: raymoe starts Ray itself (no --address,
    no Ray already running in this process). Explicit true where it cannot hold is an error."""
    explicit = config.serve.direct_http
    if explicit is False:
        return False
    if explicit and not own_cluster:
        raise ConfigError("serve.direct_http needs a Ray cluster raymoe starts itself (its settings go into Ray's "
                          "environment before Ray starts): drop --address, or set serve.direct_http: false "
                          "(on a cluster of your own, set RAY_SERVE_ENABLE_DIRECT_INGRESS there)")  # fmt: skip
    return own_cluster and ingress_replicas(config) == 1


def direct_env(port: int) -> dict[str, str]:
    """Ray Serve's settings for direct HTTP on `port` alone: a port range of one; a restarted replica
    takes the port back at once (no quarantine); stopping waits for running requests only (no
    30 s hold-open for load balancers to notice)."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    }


def check_port_free(host: str, port: int) -> None:
    """ConfigError naming the port when something already listens there."""
    with _socket(host) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot serve on {host}:{port}: {e.strerror}; pass a free --port "
                              "(or serve.port in the config)") from e  # fmt: skip


def free_port(host: str) -> int:
    """A port nothing listens on now (for Serve's unused proxy)."""
    with _socket(host) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _socket(host: str) -> socket.socket:
    """A TCP socket of host's address family."""
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)


class _ReuseAddressSocket(socket.socket):
    """A socket that may bind a port where only closing connections linger (SO_REUSEADDR)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def bind_reusing_address() -> bool:
    """In a direct-ingress replica (Serve reads RAY_SERVE_ENABLE_DIRECT_INGRESS): the sockets Serve's
    HTTP helper creates get SO_REUSEADDR. Call before the replica starts its HTTP server (in the
    deployment's constructor). True where it applied."""
    if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
        return False
    from ray.serve._private import http_util

    if getattr(http_util.socket, "socket", None) is not _ReuseAddressSocket:
        module = types.ModuleType("socket")
        module.__dict__.update(vars(socket))
        module.socket = _ReuseAddressSocket
        http_util.socket = module  # only http_util's own `socket.socket(...)` calls see it
    return True
