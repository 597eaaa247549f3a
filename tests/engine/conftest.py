import pytest

from engine_fakes import CharDetokenizer, CharTokenizer, TinyModel
from raymoe.engine.llm_engine import EngineConfig, LLMEngine


@pytest.fixture
def make_engine(monkeypatch):
    """make_engine(tokenizer=False, **EngineConfig fields) -> an LLMEngine over a fresh TinyModel."""
    monkeypatch.setattr("raymoe.engine.llm_engine.make_detokenizer", CharDetokenizer)

    def make(tokenizer: bool = False, model=None, **config) -> LLMEngine:
        config.setdefault("kv_cache_bytes", 1 << 20)
        tok = CharTokenizer() if tokenizer else None
        return LLMEngine(model or TinyModel(), tok, EngineConfig(**config))

    return make
