"""Sampler: greedy = argmax; seeded sampling reproducible and independent of batch mates."""

import torch

from raymoe.engine.sampler import make_generator, sample
from raymoe.engine.sampling_params import SamplingParams

V = 50


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3  # [B, V]


def draw(logit_rows, params, seeds, steps):
    """Sample `steps` times from the same logits; per row its own generator, like a request."""
    gens = [make_generator(s) if s is not None else None for s in seeds]
    return torch.stack([sample(logit_rows, params, gens) for _ in range(steps)], dim=1).tolist()


def test_greedy_is_argmax():
    x = logits(6)
    assert sample(x, [SamplingParams(temperature=0)] * 6, [None] * 6).tolist() == x.argmax(-1).tolist()


def test_greedy_takes_argmax_first_of_ties_and_nan():
    x = torch.randint(-2, 2, (64, V), generator=torch.Generator().manual_seed(1)).float()  # many ties
    x[::7, 3], x[::5, 9], x[1::6, 0] = float("nan"), float("inf"), -0.0
    assert sample(x, [SamplingParams(temperature=0)] * 64, [None] * 64).tolist() == x.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_equal_greedy():
    x = logits(8)
    params = [SamplingParams(top_k=1, temperature=1.5)] * 4 + [SamplingParams(top_p=1e-6, temperature=2.0)] * 4
    gens = [make_generator(i) for i in range(8)]
    for _ in range(5):
        assert sample(x, params, gens).tolist() == x.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible():
    x = logits(1)
    p = [SamplingParams(temperature=1.0, seed=1234)]
    first, second = draw(x, p, [1234], 30), draw(x, p, [1234], 30)
    assert first == second
    assert len(set(first[0])) > 1, "temperature 1 over a spread distribution should vary"
    assert draw(x, p, [99], 30) != first


def test_seeded_output_does_not_depend_on_batch_mates():
    x = logits(4, seed=1)
    mine = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=7)
    alone = draw(x[2:3], [mine], [7], 20)[0]
    mates = [SamplingParams(temperature=0), SamplingParams(temperature=1.3), mine]
    mates.append(SamplingParams(top_p=0.5, seed=3))
    together = draw(x, mates, [None, None, 7, 3], 20)
    assert together[2] == alone


def test_top_k_only_picks_the_k_best():
    x = logits(1)
    best3 = set(x[0].topk(3).indices.tolist())
    got = draw(x, [SamplingParams(temperature=5.0, top_k=3)], [0], 200)[0]
    assert set(got) <= best3 and len(set(got)) == 3


def test_top_p_keeps_the_smallest_set_reaching_p():
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    got = draw(x, [SamplingParams(temperature=1.0, top_p=0.7)], [0], 300)[0]
    assert set(got) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3


def test_sampling_follows_the_distribution():
    x = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    got = torch.tensor(draw(x, [SamplingParams(temperature=1.0)], [5], 3000)[0])
    freq = torch.bincount(got, minlength=3).float() / got.numel()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)
