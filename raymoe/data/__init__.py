"""Data shipped with raymoe: a small sample of real routing traces (`SAMPLE_TRACE`), so
`raymoe plan` runs on a fresh install. Its format and origin: docs/traces.md."""

from pathlib import Path

SAMPLE_TRACE = Path(__file__).resolve().parent / "traces" / "olmoe-1b-7b-sample"
