"""On a CUDA GPU (bench/gpu_check.sh runs this where one is lent): every family's engine on the
device, float32, gives transformers' greedy tokens; bfloat16 on CUDA stays close to float32."""

import pytest
import torch

from checkpoints import FAMILIES, assert_same_greedy, engine_greedy, load_reference, reference_greedy
from raymoe.engine.llm_engine import EngineConfig
from raymoe.engine.sampling_params import SamplingParams
from raymoe.model.model import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = [[(11 * i + 5 * j * j) % 250 + 3 for j in range(n)] for i, n in enumerate([3, 40, 17, 1, 66])]
NEW_TOKENS = 24


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cuda_float32_greedy_equals_transformers(family, checkpoint_dir):
    path = checkpoint_dir(family)
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, block_size=8, kv_cache_bytes=8 << 20,
                          dtype="float32", device="cuda")  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    got = engine_greedy(path, PROMPTS, params, config, device="cuda")
    reference = load_reference(path)
    for prompt, tokens in zip(PROMPTS, got):
        assert_same_greedy(reference, prompt, tokens, reference_greedy(reference, prompt, NEW_TOKENS))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cuda_bfloat16_logits_close_to_float32(family, checkpoint_dir):
    from raymoe.engine.model_runner import ModelRunner
    from raymoe.engine.scheduler import Scheduler  # noqa: F401 (the runner's schedule type)
    from raymoe.engine.sequence import Sequence

    path = checkpoint_dir(family)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(path, dtype=dtype, device="cuda")
        runner = ModelRunner(model, num_blocks=16, block_size=8)
        seq = Sequence(PROMPTS[1], SamplingParams(temperature=0))
        seq.block_table = list(range(-(-len(PROMPTS[1]) // 8)))
        ids, batch = runner.prepare([(seq, len(PROMPTS[1]))])
        hidden = model.forward(ids, batch, runner.kv_cache)
        logits[dtype] = model.compute_logits(hidden).float().cpu()
    err = (logits[torch.bfloat16] - logits[torch.float32]).abs().max() / logits[torch.float32].abs().max()
    assert err < 0.05, f"bfloat16 logits differ from float32 by {err:.3f} of their range"
