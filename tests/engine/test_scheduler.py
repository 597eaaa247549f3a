"""Scheduler on its own (no model): token budget, chunked prefill beside decodes, preemption."""

from raymoe.engine.block_manager import BlockManager
from raymoe.engine.sampling_params import SamplingParams
from raymoe.engine.scheduler import Scheduler
from raymoe.engine.sequence import Sequence, SequenceStatus

BS = 4


def make(num_blocks=64, max_num_seqs=8, budget=8) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_num_seqs, budget)


def seq(n: int, start: int = 0, name: str | None = None) -> Sequence:
    return Sequence(list(range(start, start + n)), SamplingParams(), request_id=name)


def step(s: Scheduler) -> list[tuple[str, int]]:
    """Schedule, then pretend the model ran: token 7 for each sequence that reached its end."""
    scheduled = s.schedule()
    ends = [[7] if seq.num_cached_tokens + n == len(seq) else [] for seq, n in scheduled]
    s.postprocess(scheduled, ends)
    return [(seq.request_id, n) for seq, n in scheduled]


def test_chunked_prefill_keeps_decodes_going():
    s = make(budget=8)
    s.add(seq(3, name="a"))
    assert step(s) == [("a", 3)]
    s.add(seq(20, start=100, name="b"))  # 20-token prompt, budget 8: chunks of 7, 7, 6 beside a's decode
    assert [step(s) for _ in range(4)] == [
        [("a", 1), ("b", 7)],
        [("a", 1), ("b", 7)],
        [("a", 1), ("b", 6)],
        [("a", 1), ("b", 1)],
    ]


def test_long_prefill_token_threshold_caps_a_prefill_per_step():
    s = Scheduler(BlockManager(64, BS), 8, 8, long_prefill_token_threshold=3)
    s.add(seq(3, name="a"))
    assert step(s) == [("a", 3)]
    s.add(seq(8, start=100, name="b"))  # the budget would take 7; the threshold takes 3 a step
    assert [step(s) for _ in range(4)] == [[("a", 1), ("b", 3)], [("a", 1), ("b", 3)], [("a", 1), ("b", 2)],
                                           [("a", 1), ("b", 1)]]  # fmt: skip


def test_decodes_go_before_unfinished_prefills():
    s = make(budget=6)
    s.add(seq(30, name="long"))
    assert step(s) == [("long", 6)]
    s.add(seq(2, start=50, name="short"))
    assert step(s) == [("long", 6)]  # no budget left for the newcomer this step
    assert step(s) == [("long", 6)]
    s.max_num_batched_tokens = 8
    assert step(s) == [("long", 8)]
    assert step(s) == [("long", 4), ("short", 2)]  # long's prompt ends; short is admitted
    assert step(s) == [("long", 1), ("short", 1)]


def test_max_num_seqs_caps_the_running_batch():
    s = make(max_num_seqs=2, budget=100)
    for i in range(3):
        s.add(seq(2, start=10 * i, name=str(i)))
    assert step(s) == [("0", 2), ("1", 2)]
    assert step(s) == [("0", 1), ("1", 1)]
    assert [x.request_id for x in s.waiting] == ["2"]


def test_preempts_the_newest_when_blocks_run_out():
    s = make(num_blocks=4, budget=100)
    a, b = seq(4, name="a"), seq(4, start=10, name="b")
    s.add(a)
    s.add(b)
    assert step(s) == [("a", 4), ("b", 4)]  # 1 block each, then each sampled a 5th token
    assert step(s) == [("a", 1), ("b", 1)]  # each took a 2nd block: pool full, now 6 tokens each
    for _ in range(3):
        step(s)  # 9 tokens each, 8 with KV: both blocks full
    assert step(s) == [("a", 1)]  # a's 9th token needs a 3rd block: b (newest) is preempted
    assert b.status is SequenceStatus.PREEMPTED and b.block_table == [] and b.num_cached_tokens == 0
    assert list(s.waiting) == [b] and s.num_preemptions == 1
    assert len(a.block_table) == 3


def test_a_preempted_sequence_is_recomputed_with_its_outputs():
    s = make(num_blocks=4, budget=100)
    a, b = seq(4, name="a"), seq(4, start=10, name="b")
    s.add(a)
    s.add(b)
    for _ in range(6):
        step(s)
    assert b.status is SequenceStatus.PREEMPTED
    tokens_before = list(b.token_ids)
    s.finish(a, "length")  # a leaves: its blocks come back
    # b's prompt and its 5 outputs (9 tokens) are recomputed at once, less its first block: freed
    # blocks keep their hash, and only the tail block was handed to a since.
    assert step(s) == [("b", 9 - BS)]
    assert b.token_ids[: len(tokens_before)] == tokens_before and b.status is SequenceStatus.RUNNING


def test_a_lone_sequence_that_cannot_grow_preempts_itself():
    s = make(num_blocks=1, budget=100)
    a = seq(3, name="a")
    s.add(a)
    step(s)  # 4 tokens: the one block is full
    assert step(s) == [("a", 1)]
    assert step(s) == []  # 5th token's KV needs a 2nd block: none, nobody else to preempt
    assert a.status is SequenceStatus.PREEMPTED


def test_prefix_hit_skips_the_cached_tokens():
    s = make(budget=100)
    s.add(seq(10, name="a"))
    step(s)
    s.add(seq(11, name="b"))  # same first 10 tokens: 2 full blocks cached
    assert step(s) == [("a", 1), ("b", 3)]


def test_finish_frees_blocks_in_any_queue():
    s = make(num_blocks=8, budget=4)
    a, b = seq(8, name="a"), seq(8, start=20, name="b")
    s.add(a)
    s.add(b)
    step(s)  # a gets 4 tokens of budget, b waits
    s.finish(b, "abort")
    s.finish(a, "abort")
    assert not s.has_unfinished() and s.block_manager.num_free_blocks == 8
    assert a.finish_reason == "abort" and a.is_finished
