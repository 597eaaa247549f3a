"""`raymoe.LLM`: the offline Python API over one engine, as in vLLM.

    llm = raymoe.LLM()                                   # the built-in model
    outs = llm.generate(["Hello", "The sky"], SamplingParams(max_tokens=32))
    for delta in llm.generate_stream("Hello"):           # tokens as they are produced
        print(delta.text, end="")
    # chunk-cache reuse (RAG): documents' KV computed once, reused at any position
    llm.generate([["Answer from:", Chunk(doc_a), Chunk(doc_b), "Q?"]], chunk_share=0.15)
    with raymoe.LLM(data_parallel_size=2) as llm:        # two engine replicas (Ray actors), both cores
        outs = llm.generate(prompts, params)             # same token ids as one engine, input order
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

from raymoe.engine.chunk_cache import LocalChunkStore
from raymoe.engine.chunks import DEFAULT_SHARE, Chunk, build_prompt
from raymoe.engine.llm_engine import EngineConfig, LLMEngine, RequestOutput
from raymoe.engine.sampling_params import SamplingParams
from raymoe.errors import ConfigError, InvalidSamplingParams

Prompt = str | list[int] | list  # text, token ids, or parts (str / Chunk / token ids) with a Chunk


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 512,
        block_size: int = 16,
        kv_cache_bytes: int = 256 << 20,
        dtype: str = "auto",
        chunk_cache_bytes: int = 64 << 20,
        threads: int | None = None,
        device: str = "auto",
        speculative: str = "none",
        num_speculative_tokens: int | None = None,
        data_parallel_size: int = 1,
    ):
        """model: a Hugging Face MoE checkpoint folder; None = the built-in model.
        chunk_cache_bytes: budget of the in-process chunk-KV cache (prompts with Chunk parts).
        threads: torch intra-op threads (process-wide); None = torch's default.
        device: cpu | cuda | cuda:N | auto (CUDA when available); dtype auto: bfloat16 on CUDA,
        float32 on the CPU (pass dtype="float32" on CUDA for outputs identical to transformers).
        speculative: "token_recycling" | "prompt_lookup" drafts tokens from the request itself and
        verifies them in the decode step (greedy output unchanged, sampled output distributed the
        same); num_speculative_tokens: draft tokens per sequence at most (None: the drafter's
        default). Off ("none") by default.
        data_parallel_size: 1 = one engine in this process. N > 1 = N engine replicas, each a Ray
        actor (its own process, so N cores run Python at once) on the CPU, with `threads` torch
        threads each (None: 1) and ceil(max_num_seqs / N) running sequences each, so about
        max_num_seqs run in all; kv_cache_bytes, chunk_cache_bytes and max_num_batched_tokens are
        per replica. `generate` splits its prompts between them (balancing prompt + max_tokens)
        and returns the outputs in prompt order, token ids equal to one engine's. Ray starts on
        loopback if this process has not joined a cluster (and stops at `shutdown()`/the end of a
        `with` block); in a joined cluster each replica reserves `threads` CPUs."""
        if model is None:
            from raymoe.model.builtin import builtin_model_path

            model = builtin_model_path()
        options = dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                       block_size=block_size, kv_cache_bytes=kv_cache_bytes, dtype=dtype, threads=threads,
                       device=device, speculative=speculative, num_speculative_tokens=num_speculative_tokens)  # fmt: skip
        config = EngineConfig(**options)  # validated here, before any replica starts
        self.replicas = None
        if _check_data_parallel(data_parallel_size, device) > 1:
            self._start_replicas(model, options, chunk_cache_bytes, data_parallel_size)
            return
        self.engine = LLMEngine.from_path(model, config, LocalChunkStore(chunk_cache_bytes))
        self.tokenizer = self.engine.tokenizer

    def _start_replicas(self, model, options: dict, chunk_cache_bytes: int, n: int) -> None:
        from raymoe.model.tokenizer import Tokenizer

        try:
            from raymoe.actors.engine_replica import EngineReplicas
        except ModuleNotFoundError as error:  # Ray comes with the 'serve' / 'cluster' extras
            from raymoe.extras import missing_extra_message

            raise ModuleNotFoundError(missing_extra_message(error) or str(error), name=error.name) from None

        threads = options["threads"] or 1
        options = {**options, "threads": threads, "device": "cpu", "chunk_cache_bytes": chunk_cache_bytes,
                   "max_num_seqs": math.ceil(options["max_num_seqs"] / n)}  # fmt: skip
        self.engine, self._next_request = None, 0
        self.tokenizer = Tokenizer.from_dir(model)
        self.replicas = EngineReplicas(model, options, n, threads)

    def shutdown(self) -> None:
        """Stop the data-parallel replicas (and the Ray this LLM started); nothing to do for one engine."""
        if self.replicas is not None:
            self.replicas.shutdown()
            self.replicas = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        chunk_share: float | None = DEFAULT_SHARE,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched; outputs in prompt order.

        A prompt given as parts with `Chunk`s reuses each chunk's cached KV wherever it sits,
        recomputing `chunk_share` of its tokens (None: adaptive); see raymoe.engine.chunks."""
        prompts = _as_prompt_list(prompts)
        params_list = params_per_prompt(params, len(prompts))
        prompts, params_list = self._resolve_chunks(prompts, params_list, chunk_share)
        if self.replicas is not None:
            return self._generate_replicated(prompts, params_list)
        request_ids = self._add_all(prompts, params_list)
        results = {rid: None for rid in request_ids}
        while any(r is None or not r.finished for r in results.values()):
            assert self.engine.has_unfinished(), "a request vanished before finishing"
            for delta in self.engine.step():
                if delta.request_id in results:
                    results[delta.request_id] = _merge(results[delta.request_id], delta)
        return [results[rid] for rid in request_ids]

    def _generate_replicated(self, prompts: list, params_list: list[SamplingParams]) -> list[RequestOutput]:
        """generate over the replicas; request ids numbered in prompt order, as one engine does."""
        costs = [self._cost(p, params) for p, params in zip(prompts, params_list)]
        outputs = self.replicas.generate(prompts, params_list, costs)
        for out in outputs:
            out.request_id = f"req-{self._next_request}"
            self._next_request += 1
        return outputs

    def _cost(self, prompt: str | list[int], params: SamplingParams | None) -> int:
        """Prompt tokens + tokens asked for: the policy's measure of a request's work."""
        max_tokens = (params if isinstance(params, SamplingParams) else SamplingParams()).max_tokens
        return len(self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt) + max_tokens

    def generate_stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield deltas (new token ids and text) as they are produced; the last has finished=True.
        Closing the iterator early aborts the request. With data_parallel_size > 1 each stream
        runs on the next replica in turn."""
        if self.replicas is not None:
            return self._stream_replicated(prompt, params)
        return self._stream(prompt, params)

    def _stream_replicated(self, prompt: Prompt, params: SamplingParams | None) -> Iterator[RequestOutput]:
        request_id, self._next_request = f"req-{self._next_request}", self._next_request + 1
        deltas = self.replicas.stream(prompt, params)
        try:
            for delta in deltas:
                delta.request_id = request_id
                yield delta
        finally:
            deltas.close()  # closed early: the replica aborts the request

    def _stream(self, prompt: Prompt, params: SamplingParams | None) -> Iterator[RequestOutput]:
        request_id = self.engine.add_request(prompt, params)
        finished = False
        try:
            while not finished:
                for delta in self.engine.step():
                    if delta.request_id == request_id:
                        finished = not self.engine.has_request(request_id)  # every sample (n) done
                        yield delta
        finally:
            if not finished:
                self.engine.abort(request_id)

    def _resolve_chunks(self, prompts: list, params_list: list[SamplingParams], share: float | None):
        """Prompts with Chunk parts -> token ids, their params carrying the ChunkReuse."""
        out_prompts, out_params = [], []
        for prompt, params in zip(prompts, params_list):
            if _is_parts(prompt):
                if self.tokenizer is None:
                    raise InvalidSamplingParams("prompts with Chunk parts need a tokenizer")
                prompt, reuse = build_prompt(self.tokenizer.encode, prompt, share)
                params = dataclasses.replace(params, chunk_reuse=reuse)
            out_prompts.append(prompt)
            out_params.append(params)
        return out_prompts, out_params

    def _add_all(self, prompts: list[Prompt], params_list: list[SamplingParams]) -> list[str]:
        """Add every request, or none: a bad prompt aborts the ones already added."""
        request_ids: list[str] = []
        try:
            for prompt, params in zip(prompts, params_list):
                request_ids.append(self.engine.add_request(prompt, params))
        except Exception:
            for rid in request_ids:
                self.engine.abort(rid)
            raise
        return request_ids


def _check_data_parallel(size, device: str) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"data_parallel_size must be a positive integer, got {size!r}")
    if size > 1 and device not in ("auto", "cpu"):
        raise ConfigError(f"data_parallel_size > 1 runs CPU replicas, got device {device!r}: "
                          "pass device='cpu' (or 'auto'), or data_parallel_size=1 for one engine on the GPU")  # fmt: skip
    return size


def _is_parts(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and any(isinstance(p, Chunk) for p in prompt)


def _as_prompt_list(prompts) -> list[Prompt]:
    """A str, a list of token ids or a list of parts with a Chunk is one prompt; a list of those is many."""
    if isinstance(prompts, str) or _is_parts(prompts) or (prompts and all(isinstance(t, int) for t in prompts)):
        return [prompts]
    return list(prompts)


def params_per_prompt(params, num_prompts: int) -> list[SamplingParams]:
    """One SamplingParams (or None: defaults) for all prompts, or a list with one per prompt."""
    if params is None or isinstance(params, SamplingParams):
        params_list = [params or SamplingParams()] * num_prompts
    else:
        params_list = list(params)
    if len(params_list) != num_prompts:
        raise InvalidSamplingParams(
            f"got {len(params_list)} SamplingParams for {num_prompts} prompts: pass one for all, or one per prompt"
        )
    if any(isinstance(p, SamplingParams) and p.n != 1 for p in params_list):
        raise InvalidSamplingParams("n: LLM.generate returns one output per prompt; pass n=1 and repeat the prompt "
                                    "with other seeds for several samples (the server's n gives n choices)")  # fmt: skip
    return params_list


def _merge(total: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    if total is None:
        return RequestOutput(delta.request_id, delta.prompt_token_ids, list(delta.token_ids), delta.text,
                             delta.finished, delta.finish_reason, 0, _copy(delta.logprobs),
                             delta.prompt_logprobs)  # fmt: skip
    if delta.logprobs is not None:
        total.logprobs += delta.logprobs
    total.token_ids.extend(delta.token_ids)
    total.text += delta.text
    total.finished, total.finish_reason = delta.finished, delta.finish_reason
    return total


def _copy(items: list | None) -> list | None:
    return None if items is None else list(items)
