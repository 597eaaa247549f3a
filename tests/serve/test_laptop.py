"""`backend: cluster` with nothing else fits a 2-CPU machine (CPUs sized from the Ray cluster), and a
resource request the cluster cannot meet fails within seconds, naming it. (The cluster backend
serving on a 2-CPU local Ray with sized CPUs: tests/serve/test_serve_cluster_backend.py.)"""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from raymoe.config import parse_config
from raymoe.serve.resources import ResourcesUnavailableError, asks, check_fits, sized_config
from serve_harness import free_port

TWO_CPUS = {"RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 2})}
FAIL_FAST_S = 60  # Ray's start on a loaded 2-core machine included; Serve's own retries took 15 minutes


def test_sizing_fits_two_cpus_and_keeps_one_cpu_per_worker_on_a_big_node():
    config = parse_config({"backend": "cluster"})
    small = asks(sized_config(config, 2.0))
    assert {a.deployment: a.per_replica["CPU"] for a in small} == {"ingress": 0.5, "prefill": 0.75, "decode": 0.75}
    check_fits(small, [{"CPU": 2.0}])
    big = asks(sized_config(config, 64.0))
    assert {a.deployment: a.per_replica["CPU"] for a in big} == {"ingress": 0.5, "prefill": 1.0, "decode": 1.0}
    explicit = sized_config(parse_config({"decode": {"num_cpus": 3}}), 2.0)
    assert explicit.decode.num_cpus == 3 and explicit.ingress.num_cpus == 0.5
    with pytest.raises(ResourcesUnavailableError, match=r"'decode' asks for CPU 3 per replica.*the cluster has CPU 2"):
        check_fits(asks(explicit), [{"CPU": 2.0}])


def test_the_ingress_inside_the_engine_leaves_every_cpu_to_the_engine_replicas():
    two = {"decode": {"autoscaling": {"max_replicas": 2}}}
    apart = asks(sized_config(parse_config({**two, "serve": {"ingress_in_engine": False}}), 2.0))
    assert {a.deployment: a.per_replica["CPU"] for a in apart} == {"ingress": 0.5, "decode": 0.75}
    for inline in ({}, {"serve": {"ingress_in_engine": True}}):  # the default with backend: engine, and said
        inline = asks(sized_config(parse_config({**two, **inline}), 2.0))
        assert {a.deployment: a.per_replica["CPU"] for a in inline} == {"decode": 1.0}


def test_an_impossible_request_fails_fast_naming_it(tmp_path):
    config = tmp_path / "raymoe.yaml"
    config.write_text(yaml.safe_dump({"backend": "cluster", "decode": {"resources": {"raymoe_gpu_node": 1}}}))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **TWO_CPUS}
    env.pop("RAY_ADDRESS", None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "raymoe", "serve", "--config", str(config), "--port", str(free_port())],
                          capture_output=True, text=True, env=env, timeout=FAIL_FAST_S)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.monotonic() - start < FAIL_FAST_S
    assert "deployment 'decode' asks for CPU 0.75, raymoe_gpu_node 1 per replica" in proc.stderr
    assert "the cluster has CPU 2, raymoe_gpu_node 0" in proc.stderr and "Traceback" not in proc.stderr
