"""raymoe.config: defaults, YAML in, frozen, and errors that say what to fix."""

import pytest

from raymoe.config import RaymoeConfig, load_config, parse_config
from raymoe.errors import ConfigError


def test_defaults_and_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine: {max_num_seqs: 4}\nserve: {port: 9000, api_key: k}\n")
    config = load_config(path)
    assert config.engine.max_num_seqs == 4 and config.serve.port == 9000 and config.backend == "engine"
    assert config.engine.to_engine_config().max_num_seqs == 4
    spec = parse_config({"engine": {"speculative": "token_recycling", "num_speculative_tokens": 8}}).engine
    assert spec.to_engine_config().speculative == "token_recycling" and spec.to_engine_config().num_speculative_tokens == 8
    capped = parse_config({"engine": {"long_prefill_token_threshold": 64}}).engine.to_engine_config()
    assert capped.long_prefill_token_threshold == 64 and RaymoeConfig().engine.long_prefill_token_threshold is None
    assert load_config(None) == RaymoeConfig()
    with pytest.raises(Exception):
        config.serve.port = 1  # frozen


@pytest.mark.parametrize("data, needle", [
    pytest.param({"engine": {"max_num_seqs": 0}}, "engine.max_num_seqs", id="not-positive"),
    pytest.param({"engine": {"max_num_seq": 4}}, "unknown setting", id="typo"),
    pytest.param({"backend": "magic"}, "'engine' or 'cluster'", id="bad-literal"),
    pytest.param({"cluster": {"placement_policy": "random"}}, "cluster.placement_policy", id="bad-policy"),
    pytest.param({"decode": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "raise max_replicas",
                 id="min-above-max"),
    pytest.param([1, 2], "must be a mapping", id="not-a-mapping"),
    pytest.param({"serve": {"api_key": ""}}, "serve.api_key: Value error, the API key is empty", id="empty-key"),
    pytest.param({"serve": {"api_key": " k "}}, "surrounding whitespace", id="key-with-spaces"),
    pytest.param({"engine": {"speculative": "medusa"}}, "engine.speculative: Input should be 'none', "
                 "'token_recycling' or 'prompt_lookup', got 'medusa'", id="bad-speculative"),
    pytest.param({"engine": {"num_speculative_tokens": 0}}, "engine.num_speculative_tokens", id="no-drafts"),
    pytest.param({"engine": {"speculative_draft_cost": 0}}, "engine.speculative_draft_cost", id="free-drafts"),
    pytest.param({"engine": {"long_prefill_token_threshold": 0}}, "engine.long_prefill_token_threshold",
                 id="no-prefill-tokens"),
    pytest.param({"backend": "cluster", "serve": {"ingress_in_engine": True, "api_key": "s3cret"}},
                 "set serve.ingress_in_engine: false or backend: engine", id="inline-needs-the-engine"),
    pytest.param({"serve": {"direct_http": True}, "decode": {"autoscaling": {"max_replicas": 2}}},
                 "set decode.autoscaling.max_replicas: 1 or serve.direct_http: false", id="direct-needs-one-replica"),
    pytest.param({"serve": {"direct_http": True, "ingress_in_engine": False}, "ingress": {"autoscaling": {
                 "max_replicas": 3}}}, "ingress may have 3", id="direct-needs-one-ingress"),
])  # fmt: skip
def test_errors_say_what_to_fix(data, needle):
    with pytest.raises(ConfigError, match=None) as e:
        parse_config(data)
    assert needle in str(e.value) and "s3cret" not in str(e.value)


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_api_key_from_flag_file_or_environment(tmp_path, monkeypatch):
    """--api-key, else --api-key-file's first line, else RAYMOE_API_KEY (kept out of `ps`)."""
    from raymoe.cli import build_parser
    from raymoe.cli import api_key as key_of

    path = tmp_path / "key"
    path.write_text("from-file\n")
    parse = lambda *flags: build_parser().parse_args(["serve", *flags])  # noqa: E731
    monkeypatch.setenv("RAYMOE_API_KEY", "from-env")
    assert key_of(parse("--api-key", "flag", "--api-key-file", str(path))) == "flag"
    assert key_of(parse("--api-key-file", str(path))) == "from-file"
    assert key_of(parse()) == "from-env"
    monkeypatch.delenv("RAYMOE_API_KEY")
    assert key_of(parse()) is None  # the config file's key, if any
    with pytest.raises(ConfigError, match="cannot read --api-key-file"):
        key_of(parse("--api-key-file", str(tmp_path / "missing")))
    path.write_text("")
    with pytest.raises(ConfigError, match="the API key is empty"):
        parse_config({"serve": {"api_key": key_of(parse("--api-key-file", str(path)))}})
