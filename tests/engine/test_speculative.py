"""Speculative decoding in the engine (tiny paged-attention model): drafts change how many tokens a
step yields, never which; sampled outputs keep their distribution; KV blocks come back."""

import math

import pytest

from engine_fakes import run_to_end
from raymoe.engine.sampling_params import SamplingParams
from test_engine import PROMPTS, staggered

DRAFTERS = ["prompt_lookup", "token_recycling"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
BLOCK_BYTES = 16 * 2 * 32 * 4  # block_size 16, 2 heads, k + v dims 32, float32


def run(make_engine, prompts, params=GREEDY, every=2, **config):
    engine = make_engine(**config)
    return staggered(engine, prompts, params, every), engine


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("room", ["roomy", "tight"])
def test_greedy_tokens_equal_plain_decoding(make_engine, drafter, room):
    """Mixed lengths joining at different steps, chunked prefill, two prompts again (prefix hits);
    `tight`: few KV blocks, so sequences are preempted and drafts dropped for want of blocks."""
    config, prompts = dict(max_num_batched_tokens=32, max_num_seqs=4), PROMPTS + PROMPTS[1:3]
    if room == "tight":
        config.update(kv_cache_bytes=7 * BLOCK_BYTES, max_num_seqs=8)
        prompts = PROMPTS[:4] + PROMPTS[5:7]  # all fit the 7 blocks
    plain, _ = run(make_engine, prompts, **config)
    out, engine = run(make_engine, prompts, speculative=drafter, num_speculative_tokens=6, **config)
    assert out == plain
    stats = engine.spec_stats()
    assert 0 < stats["num_accepted_tokens"] < stats["num_draft_tokens"], stats  # kept some, rejected some
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    if room == "tight":
        assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_batch_of_one_equals_plain_decoding(make_engine, drafter):
    plain, _ = run(make_engine, PROMPTS[4:5])
    out, engine = run(make_engine, PROMPTS[4:5], speculative=drafter)
    assert out == plain and engine.spec_stats()["mean_accepted_tokens"] > 1


def test_rejected_drafts_give_their_blocks_back_every_step(make_engine):
    engine = make_engine(speculative="token_recycling", num_speculative_tokens=40, block_size=4)
    for i, prompt in enumerate(PROMPTS[:4]):
        engine.add_request(prompt, GREEDY, request_id=str(i))
    while engine.has_unfinished():
        engine.step()
        held = sum(len(s.block_table) for s in engine.scheduler.running)
        # none past the tokens (the last token's block may come with the next step)
        assert all(-(-(len(s) - 1) // 4) <= len(s.block_table) <= -(-len(s) // 4) for s in engine.scheduler.running)
        assert held + engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.spec_stats()["num_draft_tokens"] > engine.spec_stats()["num_accepted_tokens"] > 0


STOPS = [
    SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=40, stop=["oL", "#"], ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[55, 60]),
    SamplingParams(temperature=0, max_tokens=20, logprobs=2, repetition_penalty=1.3, frequency_penalty=0.4,
                   presence_penalty=0.3, min_tokens=5, logit_bias={3: 2.0}),  # fmt: skip
]


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("params", STOPS, ids=["max_tokens", "stop", "stop_token_ids", "logprobs_penalties"])
def test_stops_logprobs_and_penalties_as_plain_decoding(make_engine, drafter, params):
    def outputs(**config):
        engine = make_engine(tokenizer=True, **config)
        ids = [engine.add_request("the quick brown fox" * k, params) for k in (1, 3)]
        deltas = {}
        while engine.has_unfinished():
            for d in engine.step():
                deltas.setdefault(d.request_id, []).append(d)
        return [(sum((d.token_ids for d in deltas[r]), []), "".join(d.text for d in deltas[r]),
                 deltas[r][-1].finish_reason, [e for d in deltas[r] for e in d.logprobs or []]) for r in ids]  # fmt: skip

    plain, spec = outputs(), outputs(speculative=drafter)
    for (tokens, text, reason, logprobs), (s_tokens, s_text, s_reason, s_logprobs) in zip(plain, spec):
        assert (s_tokens, s_text, s_reason) == (tokens, text, reason)
        assert len(tokens) <= params.max_tokens and len(s_logprobs) == len(logprobs)
        for (lp, top), (s_lp, s_top) in zip(logprobs, s_logprobs):
            assert abs(lp - s_lp) < 1e-4 and [t for t, _ in top] == [t for t, _ in s_top]


WIDE = [(0, 0), (0, 1), (0, 2), (0, 3)]  # a root with 4 children: several candidates for one token


def joint_counts(make_engine, n: int, seed0: int, temperature: float = 3.0, **config) -> tuple[dict, dict]:
    """Counts of the 3 tokens generated after a fixed prompt, over n seeded requests (the first
    comes from the prefill; drafts decide how the other two are drawn)."""
    engine = make_engine(max_num_seqs=256, max_num_batched_tokens=8192, kv_cache_bytes=8 << 20, **config)
    if engine.speculator is not None:
        engine.speculator.drafter.template = WIDE
    for i in range(n):
        params = SamplingParams(temperature=temperature, top_k=3, max_tokens=3, seed=seed0 + i, ignore_eos=True)
        engine.add_request(PROMPTS[2], params, request_id=str(i))
    counts: dict[tuple, int] = {}
    for tokens in run_to_end(engine).values():
        counts[tuple(tokens)] = counts.get(tuple(tokens), 0) + 1
    return counts, engine.spec_stats()


def two_sample_chi2(a: dict, b: dict) -> tuple[float, int]:
    """Statistic and degrees of freedom of the two-sample chi-square test (equal sample sizes)."""
    cells = set(a) | set(b)
    stat = sum((a.get(c, 0) - b.get(c, 0)) ** 2 / (a.get(c, 0) + b.get(c, 0)) for c in cells)
    return stat, len(cells) - 1


def chi2_bound(df: int, z: float = 3.72) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df) at one-sided normal z (3.72: p = 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


N_SAMPLES = 1000


def test_sampled_outputs_keep_their_distribution(make_engine, monkeypatch):
    """Token Recycling drafts the model's own top candidates: many are accepted, many rejected; its
    template is fixed to a root with 4 children (the rule for several candidates at one position)."""
    monkeypatch.setattr("raymoe.engine.spec.token_recycling.REBUILD_ROWS", 10**9)
    plain, _ = joint_counts(make_engine, N_SAMPLES, seed0=0)
    spec, stats = joint_counts(make_engine, N_SAMPLES, seed0=10**6, speculative="token_recycling",
                               num_speculative_tokens=4, speculative_token_budget=4096)  # fmt: skip
    assert stats["num_accepted_tokens"] > 200 and stats["num_draft_tokens"] > stats["num_accepted_tokens"] + 200, stats
    stat, df = two_sample_chi2(plain, spec)
    assert stat < chi2_bound(df), (stat, df)
    cooler, _ = joint_counts(make_engine, N_SAMPLES, seed0=10**6, temperature=2.0)  # the bound can fail
    stat, df = two_sample_chi2(plain, cooler)
    assert stat > chi2_bound(df), (stat, df)
