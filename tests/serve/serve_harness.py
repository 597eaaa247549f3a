"""One `raymoe serve` process for every HTTP test of the session (tests/serve and tests/client).

It runs as a subprocess (its own local Ray on 127.0.0.1, a free port), exactly as a user starts
it, and is stopped with SIGINT (Ctrl-C) at the end, which also checks the clean shutdown.
It runs the default arrangement (backend: engine, the ingress inside the engine replica); with
RAYMOE_TEST_INGRESS_IN_ENGINE=0 the ingress is a deployment of its own (`separate_config`), so
both suites check that arrangement too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

API_KEY = "test-key"
MODEL = "raymoe-builtin-moe"
MAX_QUEUE_LEN = 24  # the overload test sends more than this at once
BODY_TIMEOUT_S = 3  # a stalled request body gets 408 after this
INGRESS_SLOTS = 48  # concurrent requests per ingress replica (the overload test needs 40)
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 60

CONFIG = {
    "engine": {"max_num_seqs": 16, "max_num_batched_tokens": 256, "kv_cache_bytes": 64 << 20},
    "serve": {"max_queue_len": MAX_QUEUE_LEN, "max_body_bytes": 512 << 10, "retry_after_s": 2,
              "body_timeout_s": BODY_TIMEOUT_S},
    "ingress": {"num_cpus": 0, "max_ongoing_requests": INGRESS_SLOTS},
    # the ingress inside the engine (the default) takes the decode deployment's slots: the stalled-bodies test fills them
    "decode": {"num_cpus": 0, "max_ongoing_requests": INGRESS_SLOTS},
}


def inline_config(config: dict) -> dict:
    """`config` with the ingress inside the engine replica (the default with backend: engine), said explicitly."""
    return {**config, "serve": {**config["serve"], "ingress_in_engine": True}}


def separate_config(config: dict) -> dict:
    """`config` with the ingress a deployment of its own in front of the engine deployment."""
    return {**config, "serve": {**config["serve"], "ingress_in_engine": False}}


def proxied_config(config: dict) -> dict:
    """`config` with Serve's HTTP proxy in front of the ingress replica (serve.direct_http: false)."""
    return {**config, "serve": {**config["serve"], "direct_http": False}}


def is_direct(config: dict) -> bool:
    """Whether `raymoe serve` (its own Ray) lets the ingress replica listen on the port itself."""
    from raymoe.config import parse_config
    from raymoe.serve.direct import use_direct_http

    return use_direct_http(parse_config(config), own_cluster=True)


@dataclass
class Server:
    base_url: str
    process: subprocess.Popen
    log_path: Path
    direct: bool = False  # the ingress replica listens on the port itself (no Serve proxy, no health app)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_dir: Path, config: dict | None = None, env: dict | None = None) -> Server:
    """env: more environment, e.g. RAY_OVERRIDE_RESOURCES='{"CPU": 2}' for a 2-CPU local Ray."""
    config_path, log_path = tmp_dir / "raymoe.yaml", tmp_dir / "serve.log"
    config_path.write_text(yaml.safe_dump(CONFIG if config is None else config))
    port = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(env or {})}
    env["RAYMOE_API_KEY"] = API_KEY  # the key from the environment: not in `ps`
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "raymoe", "serve", "--config", str(config_path), "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", process, log_path, is_direct(CONFIG if config is None else config))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"raymoe serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(server)
    raise TimeoutError(f"raymoe serve was not healthy after {START_TIMEOUT_S}s:\n{server.log()}")


def stop_server(server: Server) -> int:
    """Ctrl-C, as a user would; returns the exit code (killed if it hangs)."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=10)
            return -9
    return server.process.returncode


_shared: dict = {"server": None, "users": 0}


def acquire(tmp_dir: Path) -> Server:
    if _shared["server"] is None:
        config = separate_config(CONFIG) if os.environ.get("RAYMOE_TEST_INGRESS_IN_ENGINE") == "0" else CONFIG
        if os.environ.get("RAYMOE_TEST_DIRECT_HTTP") == "0":  # every suite through Serve's HTTP proxy
            config = proxied_config(config)
        _shared["server"] = start_server(tmp_dir, config)
    _shared["users"] += 1
    return _shared["server"]


def release() -> int | None:
    _shared["users"] -= 1
    if _shared["users"] == 0 and _shared["server"] is not None:
        server, _shared["server"] = _shared["server"], None
        return stop_server(server)
    return None
