"""Data-parallel engine replicas behind `raymoe.LLM(data_parallel_size=N)`.

`EngineReplica` is the thin actor shell over a one-process `raymoe.LLM` (each replica a Ray worker
process of its own: N Python threads of control, no shared GIL). `EngineReplicas` is the driver's
side: it starts Ray on loopback if nothing did, starts the replicas, splits a batch between them
with `raymoe.policies.data_parallel.assign_requests`, runs them concurrently and puts the outputs
back in input order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import ray

from raymoe.engine.llm_engine import RequestOutput
from raymoe.engine.sampling_params import SamplingParams
from raymoe.errors import ConfigError, RaymoeError
from raymoe.policies.data_parallel import assign_requests

READY_TIMEOUT_S = 300


class EngineReplica:
    """One replica: an `LLM` with data_parallel_size 1, built from the driver's options."""

    def __init__(self, model: str, options: dict):
        from raymoe.engine.llm import LLM

        self.llm = LLM(model, **options)

    def ready(self) -> dict:
        return {"pid": os.getpid(), "node_ip": ray.util.get_node_ip_address(), "nice": os.nice(0)}

    def generate(self, prompts: list, params_list: list[SamplingParams]) -> list[RequestOutput]:
        """Prompts are text or token ids (chunk parts are resolved by the driver)."""
        return self.llm.generate(prompts, params_list)

    def stream(self, prompt, params: SamplingParams | None) -> Iterator[RequestOutput]:
        """`LLM.generate_stream` here; the driver's `ray.cancel` closes it (the request aborts)."""
        yield from self.llm.generate_stream(prompt, params)

    def work(self) -> dict:
        """Requests not finished, and tokens computed so far (prefill + decode)."""
        engine = self.llm.engine
        return {"unfinished": engine.has_unfinished(), "computed_tokens": engine.chunk_stats()["computed_tokens"]}

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system, every thread) of this replica's process so far."""
        return time.process_time()


class EngineReplicas:
    def __init__(self, model: str, options: dict, num_replicas: int, threads: int):
        """Start `num_replicas` actors, each reserving `threads` CPUs and building LLM(model, **options)."""
        self.owns_ray = start_local_ray(num_replicas * threads)
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < num_replicas * threads:
            raise ConfigError(f"data_parallel_size={num_replicas} with threads={threads} needs "
                              f"{num_replicas * threads} CPUs, the Ray cluster has {cpus:g}: lower either")  # fmt: skip
        self._turn = 0  # the replica the next stream goes to
        actor_cls = ray.remote(EngineReplica).options(num_cpus=threads, max_restarts=0)
        self.actors = [actor_cls.remote(str(model), options) for _ in range(num_replicas)]
        try:
            self.info = ray.get([a.ready.remote() for a in self.actors], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise ConfigError(f"the {num_replicas} engine replicas did not start in {READY_TIMEOUT_S} s: each "
                              f"waits for {threads} free CPUs in the Ray cluster; free some, or lower "
                              "data_parallel_size or threads") from None  # fmt: skip

    def generate(self, prompts: list, params_list: list[SamplingParams], costs: list[int]) -> list[RequestOutput]:
        """costs [requests]: prompt + max tokens of each; outputs in input order."""
        plan = assign_requests(costs, len(self.actors))
        calls = [(indices, actor.generate.remote([prompts[i] for i in indices], [params_list[i] for i in indices]))
                 for actor, indices in zip(self.actors, plan) if indices]  # fmt: skip
        outputs: list[RequestOutput | None] = [None] * len(prompts)
        for indices, ref in calls:
            for i, out in zip(indices, _get(ref)):
                outputs[i] = out
        return outputs

    def stream(self, prompt, params: SamplingParams | None) -> Iterator[RequestOutput]:
        """One request's deltas from the next replica in turn; closing early cancels it there."""
        actor = self.actors[self._turn % len(self.actors)]
        self._turn += 1
        deltas, finished = actor.stream.remote(prompt, params), False
        try:
            for ref in deltas:
                yield _get(ref)
            finished = True
        finally:
            if not finished:
                ray.cancel(deltas)

    def cpu_seconds(self) -> float:
        """The replicas' CPU seconds so far, summed."""
        return sum(ray.get([a.cpu_seconds.remote() for a in self.actors]))

    def shutdown(self) -> None:
        """Kill the replicas; shut Ray down if `start_local_ray` started it."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
        self.owns_ray = False


def start_local_ray(num_cpus: int) -> bool:
    """Start a fresh local Ray on loopback (at least `num_cpus` logical CPUs) unless this process
    already joined one. True when it started Ray (so it shuts it down)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray starts: loopback only
    # Ray renices its workers to 15: the replicas would yield every core to any other process, where
    # the one-process engine runs at the caller's priority. Theirs too, unless the caller said otherwise.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_cpus), include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    return True


def _get(ref):
    """ray.get, re-raising a replica's raymoe error as itself (not wrapped in RayTaskError)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, RaymoeError):
            raise e.cause from None
        raise
