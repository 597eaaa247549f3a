"""The help formatter every raymoe command uses: each option's help ends with its default."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the default is None/False or the help
    already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        hidden = default is None or default is False or default is argparse.SUPPRESS
        if hidden or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: {default})" if text else f"(default: {default})"
