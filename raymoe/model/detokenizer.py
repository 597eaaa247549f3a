"""Streamed text from a stream of token ids, one whole character at a time.

vLLM's scheme: decode the window `ids[prefix_offset:]` and emit what it adds beyond
`ids[prefix_offset:read_offset]`. The window gives the decoder left context, so spaces come out as in
a full decode; a window ending in U+FFFD means a UTF-8 character is still incomplete, and its bytes
are held back until a later token completes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import tokenizers
from tokenizers.decoders import DecodeStream

REPLACEMENT_CHAR = "\ufffd"  # what decoding shows for bytes that are not (yet) a whole UTF-8 character


class IncrementalDetokenizer:
    """`push(token_id) -> new text` for one sequence; `flush()` at its end.

    The two decodes of a push run in Rust through `tokenizers`' `DecodeStream`, which keeps the same
    window and offsets, without two Python calls into the tokenizer a token. Where it would not
    start from the same window (the prompt's tail decodes to nothing or to an incomplete character),
    or refuses a window whose text no longer extends its prefix, the same scheme runs here in Python
    from the offsets kept alongside, for the rest of the sequence.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        """tokenizer: a `raymoe.model.tokenizer.Tokenizer` (its `backend` decodes)."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_ids)
        self.text = ""  # everything emitted so far (never the prompt)
        self._read_offset = len(self.token_ids)  # ids before this are already in `text` (or the prompt)
        self._prefix_offset = max(self._read_offset - 5, 0)  # a few prompt tokens give the first token context
        self._stream = self._open_stream()

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is incomplete)."""
        self.token_ids.append(token_id)
        if self._stream is not None:
            try:
                delta = self._stream.step(self.tokenizer.backend, token_id)
            except Exception:  # noqa: BLE001 -- tokenizers raises a bare Exception for an invalid prefix
                self._stream = None
            else:
                if delta is None:
                    return ""
                self._emitted(delta)
                return delta
        return self._advance(allow_partial=False)

    def flush(self) -> str:
        """Emit what push held back, at the end of a sequence; bytes that never made a character show as U+FFFD."""
        self._stream = None
        return self._advance(allow_partial=True)

    def _open_stream(self) -> DecodeStream | None:
        if not isinstance(getattr(self.tokenizer, "backend", None), tokenizers.Tokenizer):
            return None
        window = self.token_ids[self._prefix_offset : self._read_offset]
        prefix = self._decode(self._prefix_offset, self._read_offset) if window else ""
        if window and (not prefix or prefix.endswith(REPLACEMENT_CHAR)):
            return None  # DecodeStream would take a later window as its prefix
        return DecodeStream(window, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, allow_partial: bool) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self.token_ids))
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT_CHAR) and not allow_partial):
            return ""
        delta = new_text[len(prefix_text) :]
        self._emitted(delta)
        return delta

    def _emitted(self, delta: str) -> None:
        self.text += delta
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.backend.decode(self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens)
