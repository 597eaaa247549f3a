"""raymoe.LLM(data_parallel_size=2): two engine replicas as Ray actors, on the built-in model.

One Ray start for the module (the LLM starts a loopback cluster unless the session already has one).
"""

import pytest

import raymoe
from raymoe import ConfigError, SamplingParams
from raymoe.errors import PromptTooLongError

OPTIONS = dict(max_num_seqs=4, max_num_batched_tokens=32, kv_cache_bytes=8 << 20)
PROMPTS = ["Hello world", "The sky is blue and the sea is deep, said the old sailor", "A",
           "Once upon a time there was", [5, 6, 7, 8, 9], "Why"]  # fmt: skip
PARAMS = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 3, 9, 4, 7, 5)]


@pytest.fixture(scope="module")
def dp_llm():
    import ray

    had_ray = ray.is_initialized()
    llm = raymoe.LLM(data_parallel_size=2, **OPTIONS)
    yield llm
    llm.shutdown()
    assert ray.is_initialized() == had_ray  # shut down only the Ray it started


def test_replicas_run_on_loopback_in_their_own_processes(dp_llm):
    import os

    import ray

    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes() if n["Alive"])
    pids = {info["pid"] for info in dp_llm.replicas.info}
    assert len(pids) == 2 and os.getpid() not in pids
    if dp_llm.replicas.owns_ray:  # its own Ray: replicas at this process's priority (Ray's default: 15)
        assert all(info["nice"] == os.nice(0) for info in dp_llm.replicas.info)
    assert dp_llm.replicas.cpu_seconds() > 0


def test_same_token_ids_as_one_engine_in_prompt_order(dp_llm):
    one = raymoe.LLM(**OPTIONS).generate(PROMPTS, PARAMS)
    two = dp_llm.generate(PROMPTS, PARAMS)
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    assert [o.prompt_token_ids for o in two] == [o.prompt_token_ids for o in one]
    assert [(o.text, o.finish_reason) for o in two] == [(o.text, o.finish_reason) for o in one]
    assert [len(o.token_ids) for o in two] == [p.max_tokens for p in PARAMS]
    assert len({o.request_id for o in two}) == len(PROMPTS)


def test_streams_take_turns_and_closing_one_aborts_it(dp_llm):
    import ray

    whole = dp_llm.generate(PROMPTS[:2], PARAMS[:2])
    for prompt, params, out in zip(PROMPTS[:2], PARAMS[:2], whole):  # one stream on each replica
        deltas = list(dp_llm.generate_stream(prompt, params))
        assert [len(d.token_ids) for d in deltas] == [1] * params.max_tokens and deltas[-1].finished
        assert sum((d.token_ids for d in deltas), []) == out.token_ids

    def work():
        return ray.get([a.work.remote() for a in dp_llm.replicas.actors])

    before = sum(w["computed_tokens"] for w in work())
    long = SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)
    stream = dp_llm.generate_stream("Once upon a time", long)
    next(stream)
    stream.close()
    after = work()  # waits for the replica's stream to end: at once when cancelled, 1500 tokens if not
    assert not any(w["unfinished"] for w in after)
    assert sum(w["computed_tokens"] for w in after) - before < 500


def test_replica_errors_stay_typed(dp_llm):
    with pytest.raises(PromptTooLongError):
        dp_llm.generate(["Hi", [5] * 100_000])
    with pytest.raises(PromptTooLongError):
        next(dp_llm.generate_stream([5] * 100_000))


@pytest.mark.parametrize(
    "options, message",
    [
        pytest.param(dict(data_parallel_size=0), "data_parallel_size must be a positive integer", id="zero"),
        pytest.param(dict(data_parallel_size=2, device="cuda"), "runs CPU replicas", id="gpu"),
        pytest.param(dict(data_parallel_size=2, max_num_seqs=0), "max_num_seqs", id="bad-engine-option"),
    ],
)
def test_bad_options_fail_before_any_replica_starts(options, message):
    with pytest.raises(ConfigError, match=message):
        raymoe.LLM(**options)
