"""Logprob entries (`raymoe.engine.logprobs.Entry`) in the two shapes of the OpenAI API.

Completions (legacy): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, one item per
token; `top_logprobs` maps token text to logprob (the chosen token included); with echo the first
prompt token has null logprob and top_logprobs. text_offset: where each token starts in the
choice's text, counted as the sum of the tokens' texts before it.
Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.
"""

from __future__ import annotations


class LogprobsFormat:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        """The token's text; a token that is part of a UTF-8 character shows its bytes
        (`bytes:\\xe2\\x80`, as OpenAI), so different tokens keep different names."""
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        raw = self._bytes(token_id) if "\ufffd" in text else None
        return text if raw is None else "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _bytes(self, token_id: int) -> bytes | None:
        """A byte-level BPE token's bytes (None for other tokenizers)."""
        piece = self.tokenizer.backend.id_to_token(token_id) if hasattr(self.tokenizer, "backend") else None
        if piece is None or any(c not in UNICODE_TO_BYTE for c in piece):
            return None
        return bytes(UNICODE_TO_BYTE[c] for c in piece)

    def completion(self, token_ids: list[int], entries: list, offset: int = 0) -> tuple[dict, int]:
        """-> the logprobs object of these tokens, and the offset after them."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(token_ids, entries, strict=True):
            text = self.token(token_id)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if entry is None:  # the first prompt token: nothing before it to predict it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(entry[0])
            out["top_logprobs"].append({**{self.token(t): lp for t, lp in entry[1]}, text: entry[0]})
        return out, offset

    def chat(self, token_ids: list[int], entries: list) -> dict:
        return {"content": [{**self._item(t, e[0]), "top_logprobs": [self._item(i, lp) for i, lp in e[1]]}
                            for t, e in zip(token_ids, entries, strict=True)], "refusal": None}  # fmt: skip

    def _item(self, token_id: int, logprob: float) -> dict:
        text = self.token(token_id)
        raw = self._bytes(token_id) if text.startswith("bytes:") else None
        return {"token": text, "logprob": logprob, "bytes": list(raw if raw is not None else text.encode("utf-8"))}


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE: the character standing for each byte in token strings."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


UNICODE_TO_BYTE = _byte_level_alphabet()
