"""Device placement without a GPU: every family's engine run with its weights on a stand-in device
(`device_mode`: `meta` tensors with real values behind them, any op mixing them with host tensors
fails) gives the CPU run's greedy tokens exactly; device and dtype options resolve and reach the
model; a CPU install imports the cluster without cupy."""

import subprocess
import sys

import pytest
import torch

from checkpoints import FAMILIES
from device_mode import DeviceMode, OnDevice, WrongDevice
from raymoe.engine.device import resolve_device, resolve_dtype
from raymoe.engine.llm_engine import EngineConfig, LLMEngine
from raymoe.engine.sampling_params import SamplingParams
from raymoe.errors import ConfigError
from raymoe.model.model import load_model

PROMPTS = [[5, 9, 17, 33, 2], [40, 41], [7] * 19]


def run(model, params) -> list[list[int]]:
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, block_size=8,
                                                 kv_cache_bytes=4 << 20))  # fmt: skip
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, params, request_id=str(i))
    out = {str(i): [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id].extend(d.token_ids)
    return [out[str(i)] for i in range(len(PROMPTS))]


def test_the_stand_in_device_catches_mixed_devices():
    with DeviceMode():
        a = torch.arange(4, device="meta")
        assert isinstance(a, OnDevice) and a.device.type == "meta" and a.tolist() == [0, 1, 2, 3]
        with pytest.raises(WrongDevice):
            a + torch.arange(4)
        assert (a * 2).cpu().tolist() == [0, 2, 4, 6] and int(a.sum()) == 6


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_tensor_follows_the_weights_device(family, checkpoint_dir):
    """Greedy and seeded sampling (with penalties, bias, logprobs), chunked prefill, continuous
    batching: same tokens as on the CPU."""
    path = checkpoint_dir(family)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3, max_tokens=6, ignore_eos=True,
                            min_p=0.01, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                            logit_bias=((7, 3.0),), min_tokens=2, logprobs=2, prompt_logprobs=1)  # fmt: skip
    expected = [run(load_model(path), p) for p in (greedy, seeded)]
    with DeviceMode() as mode, torch.inference_mode():  # the engine's tensors all made in inference mode
        model = load_model(path, device="meta")
        assert isinstance(model.embed, OnDevice)
        got = [run(model, p) for p in (greedy, seeded)]
    assert mode.ops > 100 and got == expected


def test_device_and_dtype_resolve():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") == "float32" and resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("float32", "cuda") == "float32"
    config = EngineConfig()  # auto, auto
    cpu = not torch.cuda.is_available()
    assert (config.torch_device, config.torch_dtype) == (("cpu", torch.float32) if cpu else ("cuda", torch.bfloat16))
    for bad in ("tpu", "cuda:x", 3):
        with pytest.raises(ConfigError, match="device must be one of"):
            EngineConfig(device=bad)
    if not torch.cuda.is_available():  # checked where the weights load, not in a driver without a GPU
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            EngineConfig(device="cuda").torch_device


def test_every_config_path_carries_the_device():
    from raymoe.cluster.cluster import ClusterConfig
    from raymoe.config import parse_config
    from raymoe.serve.cluster_setup import cluster_config

    config = parse_config({"engine": {"device": "cuda:1", "dtype": "bfloat16"},
                           "cluster": {"shard_num_gpus": 0.25, "transport": "nccl"}})  # fmt: skip
    cluster = cluster_config(config)
    assert (cluster.engine.device, cluster.engine.dtype, cluster.shard_num_gpus) == ("cuda:1", "bfloat16", 0.25)
    assert cluster.transport == "nccl"
    with pytest.raises(ConfigError, match="shard_num_gpus > 0"):
        parse_config({"cluster": {"transport": "nccl"}})
    with pytest.raises(ConfigError, match="transport must be one of"):
        ClusterConfig(transport="mpi")
    with pytest.raises(ConfigError, match="one group per shard process"):
        ClusterConfig(transport="gloo", num_decode_workers=2)
    assert parse_config({}).engine.to_engine_config().device == "auto"
    with pytest.raises(ConfigError, match="device"):
        parse_config({"engine": {"device": "tpu"}})


def test_a_cpu_install_imports_the_cluster_without_cupy():
    code = ("import sys; sys.modules['cupy'] = None\n"  # any `import cupy` now fails
            "import raymoe.cluster.transport_nccl, raymoe.cluster.kv_direct, raymoe.actors.cluster, raymoe.serve.app\n"
            "print('ok')")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
