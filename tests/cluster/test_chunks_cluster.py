"""Chunk-cache reuse across workers and nodes: the prefill worker (node B) assembles the prompt's KV
from chunk entries of its node's pool and publishes the blended blocks; decode workers (node C)
import them as any prefix. The tokens equal the one-process engine's with the same chunk reuse,
the pool counts the chunk hits and saved tokens, and a plain request stays exact."""

import pytest
from checkpoints import engine_greedy

from raymoe.actors.cluster import MoECluster
from raymoe.cluster.cluster import ClusterConfig
from raymoe.engine.chunk_cache import LocalChunkStore
from raymoe.engine.chunks import ChunkReuse
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.model import load_model

ENGINE = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=8, kv_cache_bytes=16 << 20)
DOCS = [[(29 * d + 5 * i * i + 3 * i) % 240 + 10 for i in range(n)] for d, n in enumerate((26, 21, 30, 17))]
ORDERS = [(2, 0, 3), (1, 3, 0), (0, 2, 1)]
PROMPTS = [[3, 4] + [t for d in order for t in DOCS[d]] + [7, 8, 9, 10 + i] for i, order in enumerate(ORDERS)]


def params(order=None, share=0.15):
    reuse = None if order is None else ChunkReuse([DOCS[d] for d in order], share)
    return SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, chunk_reuse=reuse)


@pytest.fixture(scope="module")
def path(checkpoint_dir):
    return checkpoint_dir("qwen2_moe")


def single_engine(path) -> list[list[int]]:
    engine = LLMEngine(load_model(path), None, ENGINE, LocalChunkStore(16 << 20))
    out = []
    for i, (prompt, order) in enumerate(zip(PROMPTS, ORDERS)):
        engine.add_request(prompt, params(order), str(i))  # one at a time, as the cluster below
        tokens = []
        while engine.has_unfinished():
            tokens += [t for d in engine.step() for t in d.token_ids]
        out.append(tokens)
    return out


def test_chunks_assembled_on_prefill_worker_decode_elsewhere(ray_cluster, path):
    expected = single_engine(path)
    config = ClusterConfig(engine=ENGINE, namespace="chunks", prefill_resources={"node_b": 0.01},
                           decode_resources={"node_c": 0.01})  # fmt: skip
    c = MoECluster(path, config)
    try:
        got = [c.generate([p], params(o))[0].token_ids for p, o in zip(PROMPTS, ORDERS)]
        assert got == expected
        prefill = c.stats()["prefill"][0]
        assert prefill["blended_requests"] == 3
        assert 0 < prefill["chunk_tokens_recomputed"] < 0.2 * prefill["chunk_tokens_placed"]
        decode_computed = sum(s["tokens"] for s in c.stats()["decode"])
        assert decode_computed == 3 * 15  # decode workers generated all tokens after the first
        from raymoe.actors.kv_pool import KVPoolClient, get_or_create_pool

        pool = KVPoolClient(get_or_create_pool(c.prefill_nodes[0], config.kv_pool_bytes, "chunks"))
        chunk = pool.chunk_stats()
        assert chunk["chunk_entries"] == 4  # each document computed once, on its own
        assert chunk["chunk_hits"] == 9 - 4 and chunk["chunk_saved_tokens"] > 0
        plain = engine_greedy(path, PROMPTS[:1], params(), ENGINE)
        assert [o.token_ids for o in c.generate(PROMPTS[:1], params())] == plain
    finally:
        c.shutdown()
