"""Cluster presets: per-node compute, memory bandwidth and network, as the simulator models them.

A topology node's relative speed scales its FLOP/s and memory bandwidth (a node twice as
fast does the same expert work in half the time); its network link is its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeSpec:
    flops: float  # sustained FLOP/s for the model's dtype (not the datasheet peak)
    memory_bandwidth: float  # sustained bytes/s
    network_bandwidth: float  # bytes/s each way, per node, to other nodes
    network_latency_s: float = 10e-6  # one message, one way


# Sustained figures: about 60% of datasheet peak compute, 80% of memory bandwidth.
H100_IB = NodeSpec(
    flops=0.6 * 989e12, memory_bandwidth=0.8 * 3.35e12, network_bandwidth=50e9, network_latency_s=10e-6
)  # one GPU, 400 Gb/s
# A CPU Ray node: 16 cores of AVX-512 bf16 at a modest sustained rate, 10 Gb/s Ethernet.
CPU_NODE = NodeSpec(flops=0.5e12, memory_bandwidth=40e9, network_bandwidth=1.25e9, network_latency_s=100e-6)

CLUSTERS = {"h100-ib": H100_IB, "cpu": CPU_NODE}
