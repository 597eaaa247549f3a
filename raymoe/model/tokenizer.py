"""Text <-> token ids for a Hugging Face checkpoint folder, without transformers.

`tokenizer.json` runs through the `tokenizers` package; the chat template (from
`chat_template.jinja` or `tokenizer_config.json`) renders with jinja2 in the same sandboxed
environment transformers builds, so prompts match what `AutoTokenizer.apply_chat_template` gives.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from raymoe.errors import CheckpointError, RaymoeError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.50 saves the template here
# Named special tokens transformers passes to every chat template as variables.
TEMPLATE_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(RaymoeError, ValueError):
    """The model has no chat template, or the template rejected the messages."""


class Tokenizer:
    """One checkpoint's tokenizer: `tokenizers` for ids, jinja2 for chat prompts."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        add_bos_token: bool = False,
    ):
        self.backend = backend
        self.special_tokens = dict(special_tokens or {})  # template variable name -> token text
        self.chat_template = chat_template
        self.bos_token_id = self._id_of(self.special_tokens.get("bos_token"))
        eos = [self._id_of(self.special_tokens.get("eos_token")), *extra_eos_token_ids]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos if i is not None))
        # tokenizer.json's post-processor adds BOS/EOS itself; `add_bos_token` only matters without one
        self._prepend_bos = add_bos_token and backend.post_processor is None and self.bos_token_id is not None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        config = _read_json(folder / TOKENIZER_CONFIG_FILE)
        special = {name: text for name in TEMPLATE_SPECIAL_TOKENS if (text := _token_text(config.get(name)))}
        return cls(
            backend=_load_backend(folder),
            special_tokens=special,
            chat_template=_find_chat_template(folder, config),
            extra_eos_token_ids=_model_eos_ids(folder),
            add_bos_token=bool(config.get("add_bos_token", False)),
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None, **kwargs
    ) -> str:
        """Render `messages` ({"role", "content", ...} dicts) into one prompt string, as transformers does."""
        if self.chat_template is None:
            raise ChatTemplateError(
                "this model has no chat template (none in tokenizer_config.json or chat_template.jinja); "
                "send a plain completion prompt instead, or add a template to the checkpoint"
            )
        if not messages:
            raise ChatTemplateError("messages is empty; pass at least one {'role': ..., 'content': ...} message")
        # transformers drops None fields (OpenAI clients send content=None next to tool_calls)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            template = _compile(self.chat_template)
            return template.render(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs},
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template rejected the messages: {e}") from e

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)


def _load_backend(folder: Path) -> tokenizers.Tokenizer:
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: raymoe reads the fast-tokenizer file tokenizer.json; create it with "
            "`AutoTokenizer.from_pretrained(<model>).save_pretrained(<folder>)`"
        )
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for unreadable files
        raise CheckpointError(f"{path} is corrupt ({e}); re-save the tokenizer or copy the file again") from e


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when the (optional) file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-save the checkpoint") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _find_chat_template(folder: Path, config: dict) -> str | None:
    jinja_file = folder / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():  # transformers gives the separate file priority over the config entry
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or (next(iter(named.values())) if len(named) == 1 else None)
    return template if isinstance(template, str) else None


def _model_eos_ids(folder: Path) -> list[int]:
    """EOS ids from generation_config.json, then config.json (int or list in either)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(folder / name).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    return [int(i) for i in ids]


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it just renders."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # chat templates come from the Hub, so they run sandboxed, as in transformers
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
