"""The README's main command, `raymoe generate`, and `raymoe plan`, run as a user runs them."""

import json
import os
import re
import subprocess
import sys

import pytest

from raymoe import __version__
from raymoe.cli import build_parser, main
from raymoe.data import SAMPLE_TRACE
from raymoe.engine.llm import LLM
from raymoe.engine.sampling_params import SamplingParams


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "raymoe", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_generate_streams_the_engines_greedy_text(checkpoint_dir):
    """With a real tokenizer folder: the built-in model (created on first use)."""
    proc = run("generate", "The quick brown fox", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert "INFO raymoe.model.model: loaded" in proc.stderr  # --log-level info by default: loading is not silent
    expected = LLM().generate(["The quick brown fox"], SamplingParams(max_tokens=12, temperature=0))[0].text
    assert proc.stdout == expected + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent"], "config.json not found"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--max-tokens", "0"], "max_tokens"),
    ],
)
def test_generate_bad_input_is_a_clear_error(args, message):
    proc = run("generate", "hi", *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_generate_speculative_flags(capsys):
    """Bad values are clear errors before any model loads (in process: no interpreter start-up)."""
    assert main(["generate", "hi", "--speculative", "prompt_lookup", "--num-speculative-tokens", "0"]) == 2
    assert "num_speculative_tokens must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--speculative", "medusa"])
    assert "invalid choice: 'medusa'" in capsys.readouterr().err


def test_plan_prints_a_summary_and_with_json_the_object(capsys):
    """The shipped sample trace, a domain folder of it, and its parent folder (followed, said on stderr)."""
    proc = run("plan", "--nodes", "4", "--slots-per-node", "20", "--speeds", "1,1,2,2")
    assert proc.returncode == 0, proc.stderr
    assert "olmoe-1b-7b-sample: 16 sequences" in proc.stdout and "local activations" in proc.stdout
    assert not proc.stdout.lstrip().startswith("{")
    assert main(["plan", "--trace", str(SAMPLE_TRACE / "coding"), "--nodes", "4", "--slots-per-node", "20",
                 "--json", "--log-level", "debug"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["topology"] == {"num_nodes": 4, "slots_per_node": 20, "speeds": [1.0] * 4}
    assert out["metrics"]["trace"] == "coding" and len(out["plan"]["phy2log"]) == 16
    assert main(["plan", "--trace", str(SAMPLE_TRACE.parent), "--nodes", "2", "--slots-per-node", "40", "--json",
                 "--no-plan"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert json.loads(captured.out)["metrics"]["trace"] == SAMPLE_TRACE.name
    assert f"reading {SAMPLE_TRACE}" in captured.err


def test_plan_rejects_a_node_of_speed_zero_and_an_empty_folder(tmp_path, capsys):
    assert main(["plan", "--nodes", "4", "--slots-per-node", "20", "--speeds", "0,1,1,1"]) == 2
    assert "speed" in capsys.readouterr().err
    assert main(["plan", "--trace", str(tmp_path), "--nodes", "4", "--slots-per-node", "20"]) == 2
    assert "holds no sequence_*.npz files, nor folders of them" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"raymoe {__version__}"


def test_help_shows_defaults_and_says_greedy():
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["generate"].format_help().split())
    for flag, default in (("--max-tokens", "64"), ("--temperature", "0.0"), ("--top-p", "1.0"), ("--top-k", "-1"),
                          ("--log-level", "info")):  # fmt: skip
        assert re.search(rf"{flag} \S+ .*?\(default: {re.escape(default)}\)", help_text), flag
    assert "greedily by default" in help_text
    from raymoe.policies.cli import build_parser as plan_parser

    assert "--policy NAME placement policy, one of: contiguous" in " ".join(plan_parser().format_help().split())
