"""JSON with ``//`` and ``/* */`` comments (and trailing commas), as SimpleTuner-style config files are written.

Comments are blanked out rather than removed so that the line and column of a syntax error still point at the
user's file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from shared.errors import ConfigError, Problem

_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/', re.S)
_TRAILING_COMMA = re.compile(r'"(?:\\.|[^"\\])*"|,(\s*[\]}])', re.S)


def strip_comments(text: str) -> str:
    """Replace comments by spaces (newlines kept) and drop trailing commas; strings are left untouched."""

    def blank(m: re.Match[str]) -> str:
        s = m.group(0)
        return s if s.startswith('"') else re.sub(r"[^\n]", " ", s)

    text = _TOKEN.sub(blank, text)
    return _TRAILING_COMMA.sub(lambda m: m.group(0) if m.group(1) is None else " " + m.group(1), text)


def loads(text: str, source: str) -> Any:
    """Parse JSON-with-comments; a syntax error becomes a ConfigError naming ``source``, line and column."""
    try:
        return json.loads(strip_comments(text))
    except json.JSONDecodeError as e:
        raise ConfigError(
            [Problem(f"{source}:{e.lineno}:{e.colno}", f"JSON syntax error: {e.msg}. Fix the file and run again.")]
        ) from None


def load(path: str | Path) -> Any:
    """Read and parse a JSON-with-comments file; a missing or unreadable file is a ConfigError naming it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem(str(p), "file not found; check the path (relative paths are read from the "
                                   "current directory)")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([Problem(str(p), f"cannot read the file: {e}")]) from None
    return loads(text, str(p))
