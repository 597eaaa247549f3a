"""Stop handling: stop strings trimmed (also when streamed), stop token ids, EOS, ignore_eos, max_tokens."""

import pytest

from raymoe.engine.sampling_params import SamplingParams
from raymoe.engine.sequence import Sequence
from raymoe.engine.stop import StopChecker, StopStrings

from engine_fakes import EOS, CharDetokenizer, CharTokenizer, run_to_end

TOK = CharTokenizer()


def feed(params: SamplingParams, text_tokens: str | list[int], max_model_len: int = 1000):
    """Generate the given tokens one by one; -> (visible text, finish reason, tokens consumed)."""
    ids = TOK.encode(text_tokens) if isinstance(text_tokens, str) else text_tokens
    seq = Sequence([5, 6], params)
    checker = StopChecker(params, (EOS,), max_model_len, CharDetokenizer(TOK))
    text = ""
    for token_id in ids:
        seq.append_token(token_id)
        delta, reason = checker.check(seq)
        text += delta
        if reason:
            return text, reason, seq.num_output_tokens
    return text, None, seq.num_output_tokens


@pytest.mark.parametrize(
    "stop, generated, expected_text, consumed",
    [
        pytest.param(("END",), "hello END world", "hello ", 9, id="trimmed"),
        pytest.param(("x", "lo"), "hello", "hel", 5, id="earliest-of-two"),
        pytest.param(("lo w", "o"), "hello world", "hell", 5, id="first-to-complete-wins"),
        pytest.param(("abc",), "xxabxabc", "xxabx", 8, id="partial-match-released"),
        pytest.param(("ab",), "ab", "", 2, id="stop-at-start"),
    ],
)
def test_stop_strings(stop, generated, expected_text, consumed):
    text, reason, n = feed(SamplingParams(stop=stop, max_tokens=100), generated)
    assert (text, reason, n) == (expected_text, "stop", consumed)


def test_streamed_text_never_shows_a_partial_stop_string():
    s = StopStrings(("STOP",))
    assert [s.push(c) for c in "abcST"] == [("", False)] * 3 + [("a", False), ("b", False)]
    assert s.push("O") == ("c", False)
    assert s.push("x") == ("S", False)  # "STOx" can no longer become "STOP": release in order
    assert s.flush() == "TOx"


def test_held_back_text_is_flushed_at_max_tokens():
    assert feed(SamplingParams(stop="zzz", max_tokens=4), "abcdef") == ("abcd", "length", 4)


@pytest.mark.parametrize(
    "params, tokens, expected",
    [
        pytest.param(SamplingParams(max_tokens=3), [40, 41, 42, 43], ("HIJ", "length", 3), id="max-tokens"),
        pytest.param(SamplingParams(max_tokens=9), [40, EOS, 42], ("H", "stop", 2), id="eos"),
        pytest.param(SamplingParams(max_tokens=3, ignore_eos=True), [40, EOS, 42, 43], ("HJ", "length", 3),
                     id="ignore-eos"),
        pytest.param(SamplingParams(max_tokens=9, stop_token_ids=[41]), [40, 41, 42], ("H", "stop", 2),
                     id="stop-token-id"),
        pytest.param(SamplingParams(max_tokens=9, ignore_eos=True, stop_token_ids=[EOS]), [40, EOS],
                     ("H", "stop", 2), id="stop-token-beats-ignore-eos"),
        pytest.param(SamplingParams(max_tokens=1, stop_token_ids=[40]), [40], ("", "stop", 1),
                     id="stop-beats-length"),
    ],
)
def test_token_stops(params, tokens, expected):
    assert feed(params, tokens) == expected


def test_context_limit_finishes_with_length():
    assert feed(SamplingParams(max_tokens=100), "abcdef", max_model_len=5) == ("abc", "length", 3)


def test_engine_trims_stop_strings_and_keeps_the_tokens(make_engine):
    engine = make_engine(tokenizer=True)
    free = run_to_end_with_text(engine, "Hi there", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    ids, text = free
    assert len(ids) == 12
    stop = text[5:7]  # a string the greedy continuation produces
    first = text.find(stop)
    engine2 = make_engine(tokenizer=True)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=stop)
    ids2, text2 = run_to_end_with_text(engine2, "Hi there", params)
    assert text2 == text[:first]
    # The tokens that spelled the stop string stay in token_ids; generation ended right after them.
    assert ids2 == ids[: len(ids2)]
    assert TOK.decode(ids2).endswith(stop) and stop not in TOK.decode(ids2[:-1])


def run_to_end_with_text(engine, prompt, params):
    engine.add_request(prompt, params, request_id="r")
    ids, text, reasons = [], "", []
    while engine.has_unfinished():
        for d in engine.step():
            ids += d.token_ids
            text += d.text
            reasons.append(d.finish_reason)
    assert reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1])
    return ids, text


def test_engine_stop_token_ids(make_engine):
    engine = make_engine()
    engine.add_request([3, 4, 5], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), request_id="a")
    ids = run_to_end(engine)["a"]
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[ids[3]])
    engine.add_request([3, 4, 5], params, request_id="b")
    assert run_to_end(engine)["b"] == ids[: ids.index(ids[3]) + 1]
