"""Run a cluster's generate in a thread and act once decoding is under way."""

import threading
import time

import ray


def decoded_tokens(cluster) -> int:
    total = 0
    for w in cluster.router.decode:
        try:
            total += ray.get(w.stats.remote(), timeout=30)["tokens"]
        except ray.exceptions.RayActorError:
            pass
    return total


def generate_while(cluster, prompts, params, disturb, after_tokens: int = 40):
    """Generate in a thread; call `disturb()` once `after_tokens` more tokens were decoded.
    Returns (token ids per prompt, disturb's return value)."""
    result, start = {}, decoded_tokens(cluster)
    thread = threading.Thread(target=lambda: result.update(out=cluster.generate(prompts, params)))
    thread.start()
    deadline = time.monotonic() + 120
    while decoded_tokens(cluster) < start + after_tokens and time.monotonic() < deadline:
        time.sleep(0.02)
    assert thread.is_alive(), "generation ended before the disturbance: give it more tokens"
    value = disturb()
    thread.join(timeout=300)
    assert not thread.is_alive(), "generation did not finish"
    return [o.token_ids for o in result["out"]], value
