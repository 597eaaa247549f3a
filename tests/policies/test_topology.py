import math

import numpy as np
import pytest

from raymoe.policies import Topology, TopologyError


def test_defaults_to_equal_speeds():
    topology = Topology(3, 4)
    assert topology.speeds == (1.0, 1.0, 1.0)
    assert topology.num_slots == 12 and topology.is_uniform
    np.testing.assert_array_equal(topology.speed_array, [1.0, 1.0, 1.0])


@pytest.mark.parametrize("speeds", [(1, 0), (1, -2), (1, math.nan), (1, math.inf)],
                         ids=["speed-zero", "speed-negative", "speed-nan", "speed-inf"])
def test_bad_speed_rejected_with_what_to_fix(speeds):
    with pytest.raises(TopologyError, match=r"node 1 has speed .* must be a finite number > 0"):
        Topology(2, 4, speeds)


def test_topology_error_is_a_value_error():
    with pytest.raises(ValueError):
        Topology(2, 4, (1, 0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_nodes=0, slots_per_node=4), "num_nodes=0"),
    (dict(num_nodes=2, slots_per_node=0), "slots_per_node=0"),
    (dict(num_nodes=2, slots_per_node=4, speeds=(1,)), "1 speeds given for 2 nodes"),
], ids=["no-nodes", "no-slots", "speeds-length"])
def test_bad_shape_rejected(kwargs, message):
    with pytest.raises(TopologyError, match=message):
        Topology(**kwargs)


def test_check_fits_says_how_many_slots():
    with pytest.raises(TopologyError, match="raise slots_per_node to at least 16"):
        Topology(4, 15).check_fits(64)
    Topology(4, 16).check_fits(64)
