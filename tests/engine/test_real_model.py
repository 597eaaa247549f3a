"""The engine on a real (tiny, random) Mixtral checkpoint: staggered, chunked batching gives the
same greedy tokens as one request at a time, and as transformers."""

import torch

from engine_fakes import run_to_end
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.model import load_model

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[(11 * i + 5 * j) % 250 + 3 for j in range(n)] for i, n in enumerate([5, 37, 1, 70, 12])]


def test_staggered_chunked_batching_is_lossless(checkpoint_dir):
    from checkpoints import load_reference

    path = checkpoint_dir("mixtral")
    model = load_model(path)
    config = EngineConfig(max_num_batched_tokens=16, max_num_seqs=3, kv_cache_bytes=4 << 20)
    engine = LLMEngine(model, None, config)
    out: dict[str, list[int]] = {}
    for i, prompt in enumerate(PROMPTS):  # prompt i joins at step 2 * i
        engine.add_request(prompt, PARAMS, request_id=str(i))
        for _ in range(2):
            for d in engine.step():
                out.setdefault(d.request_id, []).extend(d.token_ids)
    for rid, ids in run_to_end(engine).items():
        out.setdefault(rid, []).extend(ids)

    reference = load_reference(path)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            hf = reference.generate(
                torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert out[str(i)] == hf[0, len(prompt) :].tolist(), f"prompt {i}"
