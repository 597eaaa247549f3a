import pytest

from raymoe.engine.sampling_params import SamplingParams
from raymoe.errors import InvalidSamplingParams


@pytest.mark.parametrize(
    "kwargs, field_name",
    [
        pytest.param(dict(temperature=-0.1), "temperature", id="negative-temperature"),
        pytest.param(dict(temperature=float("nan")), "temperature", id="nan-temperature"),
        pytest.param(dict(temperature="hot"), "temperature", id="string-temperature"),
        pytest.param(dict(top_k=-2), "top_k", id="top-k-below-minus-one"),
        pytest.param(dict(top_k=2.5), "top_k", id="float-top-k"),
        pytest.param(dict(top_p=0.0), "top_p", id="zero-top-p"),
        pytest.param(dict(top_p=1.5), "top_p", id="top-p-above-one"),
        pytest.param(dict(seed=-1), "seed", id="negative-seed"),
        pytest.param(dict(seed=1.0), "seed", id="float-seed"),
        pytest.param(dict(max_tokens=0), "max_tokens", id="zero-max-tokens"),
        pytest.param(dict(max_tokens=True), "max_tokens", id="bool-max-tokens"),
        pytest.param(dict(stop=""), "stop", id="empty-stop-string"),
        pytest.param(dict(stop=["ok", 3]), "stop", id="non-string-stop"),
        pytest.param(dict(stop_token_ids=[-1]), "stop_token_ids", id="negative-stop-token"),
        pytest.param(dict(stop_token_ids=5), "stop_token_ids", id="stop-token-not-a-list"),
        pytest.param(dict(ignore_eos="yes"), "ignore_eos", id="string-ignore-eos"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field_name):
    with pytest.raises(InvalidSamplingParams, match=field_name):
        SamplingParams(**kwargs)


def test_invalid_is_a_value_error():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=2)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(temperature=0), dict(top_k=0), dict(top_k=-1), dict(top_k=1), dict(top_p=1), dict(top_p=1e-9),
     dict(seed=0), dict(seed=2**64 - 1), dict(max_tokens=1), dict(stop=None), dict(stop_token_ids=None)],
)
def test_valid_values(kwargs):
    SamplingParams(**kwargs)


def test_stop_is_normalised_and_frozen():
    p = SamplingParams(stop="END", stop_token_ids=[7, 8])
    assert p.stop == ("END",) and p.stop_token_ids == (7, 8)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    with pytest.raises(AttributeError):
        p.temperature = 0.5


def test_defaults():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.seed, p.max_tokens, p.ignore_eos) == (1.0, -1, 1.0, None, 16, False)
    assert not p.is_greedy and SamplingParams(temperature=0).is_greedy and SamplingParams(top_k=1).is_greedy
