"""LLMEngine: the one-process engine. Requests in, token deltas out, one step at a time.

`step()` is: schedule, run the model, record the step, check stops, collect finished. Requests may
be added between any two steps; they join the running batch (continuous batching).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import torch

from raymoe.engine.block_hash import CacheSalt, block_hash, chain_parent
from raymoe.engine.block_manager import BlockManager
from raymoe.engine.chunk_work import Blender
from raymoe.engine.chunks import plan_blend
from raymoe.engine.engine_config import EngineConfig
from raymoe.engine.kv_tail import adopt_tails, export_tail, tail_span
from raymoe.engine.kv_transfer import block_key, export_blocks, import_blocks
from raymoe.engine.model_runner import ModelRunner, num_kv_blocks
from raymoe.engine.samples import Samples, fork
from raymoe.engine.sampling_params import SamplingParams
from raymoe.engine.scheduler import Scheduler
from raymoe.engine.sequence import Sequence
from raymoe.engine.spec.registry import make_speculator
from raymoe.engine.spec.speculator import SpecStats
from raymoe.engine.stop import StopChecker
from raymoe.errors import InvalidRequestError, InvalidSamplingParams, PromptTooLongError

@dataclass
class RequestOutput:
    """From `step()`: a delta (this step's new tokens and text). From `LLM.generate`: the whole output."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" once finished
    index: int = 0  # which sample of the request (SamplingParams.n); each finishes on its own
    logprobs: list | None = None  # a `raymoe.engine.logprobs.Entry` per token, when params.logprobs asks
    prompt_logprobs: list | None = None  # with the first token: None, then an Entry per prompt token


class LLMEngine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, chunk_store=None):
        """model: a loaded `MoEModel`; tokenizer: a `raymoe.model.tokenizer.Tokenizer`, or None
        for an engine that takes token-id prompts only (its outputs carry no text). chunk_store: where
        chunk KV lives for requests with `SamplingParams.chunk_reuse` (`raymoe.engine.chunks`);
        None = such requests prefill in full (or import their blended blocks)."""
        self.config = config = config or EngineConfig()
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.model, self.tokenizer = model, tokenizer
        spec = model.spec
        self.eos_token_ids = tuple(sorted(set(spec.eos_token_ids) | set(getattr(tokenizer, "eos_token_ids", ()))))
        num_blocks = num_kv_blocks(
            model.kv_layout(), config.block_size, model.dtype, config.kv_cache_bytes,
            config.max_num_seqs, spec.max_position_embeddings,
        )  # fmt: skip
        # Tokens one sequence may reach: the model's context, or the whole KV pool if smaller.
        self.max_model_len = min(spec.max_position_embeddings, num_blocks * config.block_size)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.speculator = make_speculator(config.speculative, config.num_speculative_tokens,
                                          config.speculative_token_budget, spec.vocab_size, self.max_model_len,
                                          config.speculative_draft_cost)  # fmt: skip
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.speculator, config.long_prefill_token_threshold)  # fmt: skip
        self.model_runner = ModelRunner(model, num_blocks, config.block_size)
        self.model_runner.eos_token_ids = self.eos_token_ids
        self.model_runner.speculator = self.speculator
        self.blender = Blender(self.model_runner, self.block_manager, config.block_size, chunk_store)
        self._last_import: tuple[tuple[int, ...], object] | None = None
        self.requests: dict[str, tuple[Sequence, StopChecker]] = {}  # unfinished samples, by sample id
        self.samples = Samples()  # requests with n > 1: their other samples' ids, and those not started
        self._request_ids = count()

    @classmethod
    def from_path(cls, path: str | Path, config: EngineConfig | None = None, chunk_store=None) -> "LLMEngine":
        from raymoe.model.model import load_model
        from raymoe.model.tokenizer import Tokenizer

        config = config or EngineConfig()
        model = load_model(path, dtype=config.torch_dtype, device=config.torch_device)
        return cls(model, Tokenizer.from_dir(path), config, chunk_store)

    # ----- requests --------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        output_token_ids: list[int] = (),
    ) -> str:
        """Queue a request; it joins the batch at the next step. Returns its request id.

        output_token_ids: tokens this request already generated elsewhere (resuming it); they count
        towards max_tokens and are not returned again."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidSamplingParams(f"params must be a SamplingParams, got {type(params).__name__}")
        request_id = self._new_request_id(request_id)
        prompt_ids = self._prompt_token_ids(prompt, len(output_token_ids))
        self._check_token_ids(list(output_token_ids))
        seq = Sequence.resumed(prompt_ids, list(output_token_ids), params, request_id)
        last_import, self._last_import = self._last_import, None
        if params.chunk_reuse is not None:
            self._plan_chunks(seq, last_import)
        self._start(seq, output_token_ids)
        if params.n > 1:  # the others start once this one's prompt KV is cached (see _start_forks)
            self.samples.add(request_id, [fork(seq, i) for i in range(1, params.n)])
        return request_id

    def _start(self, seq: Sequence, output_token_ids=()) -> None:
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = make_detokenizer(self.tokenizer, seq.prompt_token_ids)
            for token_id in output_token_ids:  # already shown to the user elsewhere
                detokenizer.push(token_id)
        checker = StopChecker(seq.params, self.eos_token_ids, self.max_model_len, detokenizer)
        self.requests[seq.request_id] = (seq, checker)
        self.scheduler.add(seq)

    def _start_forks(self, seqs: list[Sequence]) -> None:
        """A request's other samples join once its first sample has its first token: its full
        prompt blocks are cached by then, so they share them (and recompute only the tail)."""
        for seq in seqs:
            for other in self.samples.take_pending(seq.request_id):
                self._start(other)

    def spec_stats(self) -> dict[str, float]:
        """Speculative decoding's counters, acceptance rate and mean accepted length (all 0 when off)."""
        return (self.speculator.stats if self.speculator is not None else SpecStats()).as_dict()

    def set_chunk_store(self, store) -> None:
        """Where chunk KV lives (a `raymoe.engine.chunks.ChunkStore`); None turns chunk reuse off."""
        self.blender.store = store

    def chunk_stats(self) -> dict[str, float]:
        """Chunk-reuse counters, and `computed_tokens`: prefill + decode tokens computed (missing
        chunks too: they run in the steps' forwards), a blend's partial layers counted as the
        equivalent whole tokens."""
        num_layers = len(self.model.kv_layout())
        st = dict(self.blender.stats)
        st["computed_tokens"] = self.model_runner.num_computed_tokens + st["blend_token_layers"] / num_layers
        return st

    def _plan_chunks(self, seq: Sequence, last_import) -> None:
        """Place the request's chunks; its blocks hash under the plan's salt. A worker that imported
        this prompt's blocks just before (`import_prefix`, as DecodeCore.submit does) imports the
        salted ones now with the same fetch: the salt comes with the params."""
        plan = plan_blend(seq.prompt_token_ids, seq.params.chunk_reuse, self.config.block_size)
        if plan is None:
            return
        seq.blend_plan, seq.cache_salt = plan, plan.salt
        if plan.salt is not None and last_import is not None and last_import[0] == tuple(seq.token_ids):
            self.import_prefix(seq.token_ids, last_import[1], plan.salt)

    def import_prefix(self, token_ids: list[int], fetch, salt: CacheSalt | None = None) -> int:
        """Bring the KV of `token_ids`' leading full blocks from a pool, as cached blocks, so the
        next request with this prefix skips their compute.

        fetch(keys: list[str]) -> list[Tensor | None]: exported blocks (see raymoe.engine.kv_transfer)
        by content key, None where the pool misses. salt: the hash namespace of a chunk-reuse
        request's blocks (`raymoe.engine.chunks.request_salt`). Returns the number of prefix blocks
        now cached."""
        self._last_import = (tuple(token_ids), fetch) if salt is None else None
        chain = block_chain(token_ids, self.config.block_size, salt)
        missing = [i for i, (h, toks) in enumerate(chain) if not self.block_manager.is_cached(h, toks)]
        fetched = fetch([block_key(chain[i][0]) for i in missing]) if missing else []
        for i, block in zip(missing, fetched):
            if block is None or not self.block_manager.can_adopt():
                return i
            block_id = self.block_manager.adopt(*chain[i])
            import_blocks(self.model_runner.kv_cache, [block_id], [block])
        return len(chain)

    def export_prefix(self, token_ids: list[int], salt: CacheSalt | None = None) -> tuple[list[str], list]:
        """(keys, exported blocks) of `token_ids`' leading full blocks cached here, in order
        (stops at the first block not cached); salt as in `import_prefix`."""
        keys, block_ids = [], []
        for h, tokens in block_chain(token_ids, self.config.block_size, salt):
            if not self.block_manager.is_cached(h, tokens):
                break
            keys.append(block_key(h))
            block_ids.append(self.block_manager.hash_to_block_id[h])
        return keys, export_blocks(self.model_runner.kv_cache, block_ids) if block_ids else []

    def export_tail(self, request_id: str) -> tuple[str, torch.Tensor] | None:
        """(pool key, exported block) of a running request's computed partial block, to move with
        its full blocks (`raymoe.engine.kv_tail`); None when it has none."""
        seq, _ = self.requests[request_id]
        return export_tail(seq, self.model_runner.kv_cache, self.config.block_size)

    def set_kv_tail(self, request_id: str, block: torch.Tensor) -> None:
        """Give a request added just now (not started) its partial block's KV (`export_tail` of the
        engine it left); adopted when it is admitted if its full blocks hit the prefix cache."""
        seq, _ = self.requests[request_id]
        seq.kv_tail = (tail_span(len(seq.token_ids), self.config.block_size)[1], block)

    def abort(self, request_id: str) -> None:
        """Drop a request (all its samples) wherever it is; its blocks are freed. Unknown ids are ignored."""
        for sample_id in [request_id, *self.samples.pop(request_id)]:
            if sample_id in self.requests:
                seq, _ = self.requests.pop(sample_id)
                self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def has_request(self, request_id: str) -> bool:
        """Whether any sample of the request is unfinished (or not started yet)."""
        return request_id in self.requests or self.samples.has(request_id)

    # ----- one step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; return a delta for every request that got a token."""
        scheduled = self.blender.run_pending(self.scheduler.schedule())
        scheduled = adopt_tails(scheduled, self.model_runner.kv_cache, self.config.block_size)
        token_ids = self.model_runner.run(scheduled)
        scheduled, token_ids = self.blender.finish_step(scheduled, token_ids)
        sampled = self.scheduler.postprocess(scheduled, token_ids)
        outputs = [self._check_stop(seq, num_new) for seq, num_new in sampled]
        seqs = [seq for seq, _ in sampled]
        self._collect_finished(seqs)
        self._start_forks(seqs)
        return outputs

    def _check_stop(self, seq: Sequence, num_new: int) -> RequestOutput:
        """The stop checks after each of seq's `num_new` new tokens (several from a verified draft);
        tokens after the first that finishes it are dropped."""
        checker = self.requests[seq.request_id][1]
        if num_new == 1:  # a decode: its token is already in place
            kept = seq.token_ids[-1:]
            text, finish_reason = checker.check(seq)
        else:
            new = seq.token_ids[-num_new:]
            del seq.token_ids[-num_new:]
            text, finish_reason, kept = "", None, []
            for token_id in new:
                seq.append_token(token_id)
                kept.append(token_id)
                delta, finish_reason = checker.check(seq)
                text += delta
                if finish_reason is not None:
                    break
        if finish_reason is not None:
            self.scheduler.finish(seq, finish_reason)
        out = RequestOutput(self.samples.parent(seq.request_id), seq.prompt_token_ids, kept, text,
                            finish_reason is not None, finish_reason, seq.index)  # fmt: skip
        if seq.params.logprobs is not None:
            out.logprobs = seq.new_logprobs[: len(kept)]
        if seq.params.prompt_logprobs is not None and seq.num_output_tokens == 1:
            out.prompt_logprobs = [None, *seq.prompt_logprobs]
        return out

    def _collect_finished(self, seqs: list[Sequence]) -> None:
        """By sample id: several samples of one request may finish in the same step."""
        for seq in seqs:
            if seq.is_finished:
                del self.requests[seq.request_id]
                self.samples.finished(seq.request_id)

    # ----- input checks ----------------------------------------------------------------------
    def _prompt_token_ids(self, prompt: str | list[int], num_outputs: int = 0) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this engine has no tokenizer: pass the prompt as a list of token ids")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
            self._check_token_ids(token_ids)
        if not token_ids:
            raise InvalidRequestError("the prompt is empty: pass at least one token of text")
        if len(token_ids) + num_outputs + 1 > self.max_model_len:
            raise PromptTooLongError(self._too_long_message(len(token_ids) + num_outputs))
        return token_ids

    def _check_token_ids(self, token_ids: list) -> None:
        vocab_size = self.model.spec.vocab_size
        bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab_size}); got {bad[:5]}")

    def _too_long_message(self, num_tokens: int) -> str:
        limit = self.max_model_len - 1
        message = f"the prompt has {num_tokens} tokens, but at most {limit} fit (room for 1 generated token)"
        if self.max_model_len < self.model.spec.max_position_embeddings:
            return f"{message}: the KV cache holds {self.max_model_len} tokens; raise kv_cache_bytes"
        return f"{message}: the model's context is {self.max_model_len} tokens; shorten the prompt"

    def _new_request_id(self, request_id: str | None) -> str:
        if request_id is None:
            request_id = f"req-{next(self._request_ids)}"
            while self.has_request(request_id):
                request_id = f"req-{next(self._request_ids)}"
        elif self.has_request(request_id):
            raise InvalidRequestError(f"request id {request_id!r} is already in use; pick another")
        return request_id


def block_chain(token_ids: list[int], block_size: int, salt: CacheSalt | None = None) -> list[tuple[int, list[int]]]:
    """(hash, tokens) of each full block that a prefix hit may cover (never the last token)."""
    chain, parent = [], None
    for i in range((len(token_ids) - 1) // block_size):
        tokens = list(token_ids[i * block_size : (i + 1) * block_size])
        parent = block_hash(chain_parent(parent, i, salt), tokens)
        chain.append((parent, tokens))
    return chain


def make_detokenizer(tokenizer, prompt_ids: list[int]):
    """A fresh per-request detokenizer (`push(token_id) -> new text`); the prompt gives left context."""
    from raymoe.model.detokenizer import IncrementalDetokenizer

    return IncrementalDetokenizer(tokenizer, prompt_ids)
