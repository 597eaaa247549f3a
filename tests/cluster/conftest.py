"""One real local Ray cluster for all cluster tests: three nodes of unequal size and speed.

head: 4 CPUs, speed 1; node B: 3 CPUs, speed 2; node C: 2 CPUs, speed 1 (logical CPUs are
oversubscribed on purpose: the machine has two cores). Everything binds to 127.0.0.1.
"""

import os

import pytest

NODES = [
    {"num_cpus": 4, "resources": {"raymoe_speed": 1, "node_head": 1}},
    {"num_cpus": 3, "resources": {"raymoe_speed": 2, "node_b": 1}},
    {"num_cpus": 2, "resources": {"raymoe_speed": 1, "node_c": 1}},
]


@pytest.fixture(scope="session")
def ray_cluster():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray starts: loopback only
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=NODES[0])
    for args in NODES[1:]:
        cluster.add_node(**args)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 3
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes), [n["NodeManagerAddress"] for n in nodes]
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def node_id_with(resource: str) -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])
