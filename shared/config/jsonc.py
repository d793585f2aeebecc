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


MAX_CHARS = 4 * 1024 * 1024  # a config or dataset file larger than this is not a config file
MAX_DEPTH = 64  # SimpleTuner's files nest 3 levels deep; this bounds the parser's recursion
_BRACKETS = re.compile(r'"(?:\\.|[^"\\])*"|[\[\]{}]')


def _depth(text: str) -> int:
    """The deepest nesting of [] and {} outside strings (comments already blanked)."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(text):
        token = m.group(0)
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    return deepest


def loads(text: str, source: str) -> Any:
    """Parse JSON-with-comments; a syntax error, an oversized file or one nested too deeply becomes a ConfigError
    naming ``source`` (with line and column for a syntax error)."""
    if len(text) > MAX_CHARS:
        raise ConfigError(
            [
                Problem(
                    source, f"is {len(text)} characters; a config file is at most {MAX_CHARS} (is this the right file?)"
                )
            ]
        )
    stripped = strip_comments(text)
    if _depth(stripped) > MAX_DEPTH:
        raise ConfigError(
            [Problem(source, f"nests objects and lists more than {MAX_DEPTH} levels deep; a config file needs 3")]
        )
    try:
        return json.loads(stripped)
    except json.JSONDecodeError as e:
        raise ConfigError(
            [Problem(f"{source}:{e.lineno}:{e.colno}", f"JSON syntax error: {e.msg}. Fix the file and run again.")]
        ) from None
    except RecursionError:  # belt and braces: _depth already bounds it
        raise ConfigError([Problem(source, "nests too deeply to parse")]) from None


def load(path: str | Path) -> Any:
    """Read and parse a JSON-with-comments file; a missing or unreadable file is a ConfigError naming it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [Problem(str(p), "file not found; check the path (relative paths are read from the current directory)")]
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([Problem(str(p), f"cannot read the file: {e}")]) from None
    return loads(text, str(p))
