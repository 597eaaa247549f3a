"""The README's main command, `raymoe generate`, and `raymoe plan`, run as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raymoe.engine.llm import LLM
from raymoe.engine.sampling_params import SamplingParams

TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "olmoe-1b-7b"


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "raymoe", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_generate_streams_the_engines_greedy_text(checkpoint_dir):
    """With a real tokenizer folder: the built-in model (created on first use)."""
    proc = run("generate", "The quick brown fox", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
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


@pytest.mark.skipif(not TRACES.is_dir(), reason="../shared absent")
def test_plan_prints_a_plan_and_its_metrics():
    proc = run("plan", "--trace", str(TRACES / "coding"), "--nodes", "4", "--slots-per-node", "20")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out and isinstance(out, dict)


@pytest.mark.skipif(not TRACES.is_dir(), reason="../shared absent")
def test_plan_rejects_a_node_of_speed_zero():
    proc = run("plan", "--trace", str(TRACES / "coding"), "--nodes", "4", "--slots-per-node", "20",
               "--speeds", "0,1,1,1")  # fmt: skip
    assert proc.returncode == 2
    assert "speed" in proc.stderr and "Traceback" not in proc.stderr
