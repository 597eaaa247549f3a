"""Documents in a request (chunk-cache reuse, docs/chunks.md): the prompt as parts, each tokenized
alone, so a document has the same tokens wherever it sits and its KV can be reused there.

- completions: `raymoe_documents: [doc, ...]` go before the prompt (the question);
- chat: a message's content parts marked `{"type": "text", "text": doc, "raymoe_document": true}`;
  the message's parts are joined by blank lines, the chat template renders the conversation, and
  the rendered text is cut at each document.
"""

from __future__ import annotations

from raymoe.engine.chunks import Chunk
from raymoe.errors import InvalidRequestError

PART_SEPARATOR = "\n\n"


def completion_parts(prompt: str, documents: list[str]) -> list:
    return [Chunk(d) for d in documents] + [prompt]


def chat_documents(messages: list[dict]) -> tuple[list[dict], list[str]]:
    """Messages with marked document parts flattened to text, and the documents in order."""
    flat, documents = [], []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list) or not any(p.get("raymoe_document") for p in content):
            flat.append(m)
            continue
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError("a message with raymoe_document parts may hold only text parts")
            texts.append(part["text"])
            if part.get("raymoe_document"):
                documents.append(part["text"])
        flat.append({**m, "content": PART_SEPARATOR.join(texts)})
    return flat, documents


def split_rendered(text: str, documents: list[str]) -> list:
    """The rendered prompt cut into [text, Chunk(doc), text, ...] at each document, in order."""
    parts, start = [], 0
    for doc in documents:
        at = text.find(doc, start)
        if at < 0:
            raise InvalidRequestError("the chat template changed a document's text; send it as a completion")
        parts += [text[start:at], Chunk(doc)]
        start = at + len(doc)
    return parts + [text[start:]]
