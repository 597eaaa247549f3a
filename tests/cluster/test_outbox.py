"""The decode worker's outbox (no Ray): a lingering poll gathers the tokens of several steps in one
answer, and answers at once when a request finishes."""

import threading
import time

from raymoe.actors.decode import Outbox
from raymoe.cluster.handoff import TokenDelta


def _later(outbox: Outbox, delay_s: float, deltas: dict) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), outbox.add(deltas)))
    thread.start()
    return thread


def test_linger_gathers_steps_and_a_finish_answers_at_once():
    outbox = Outbox()
    outbox.add({"a": TokenDelta([1])})
    step = _later(outbox, 0.05, {"a": TokenDelta([2])})
    assert outbox.take(["a"], timeout_s=5, linger_s=0.3)["a"].token_ids == [1, 2]  # one answer, two steps
    step.join()
    outbox.add({"a": TokenDelta([3])})
    done = _later(outbox, 0.05, {"a": TokenDelta([4], finished=True, finish_reason="length")})
    start = time.monotonic()
    got = outbox.take(["a"], timeout_s=5, linger_s=10)
    assert got["a"].token_ids == [3, 4] and got["a"].finished and time.monotonic() - start < 5
    done.join()
    assert outbox.take(["a"], timeout_s=0.01) == {}  # nothing left; no linger without tokens
