"""Which object keys are allowed: ``/``-separated relative paths, each segment a name a file system can hold.

The rules keep keys meaningful as relative paths on every backend: a LocalStore maps them to files, so ``..``,
absolute paths and odd characters could otherwise escape the root or collide. Apart from the store, the config
checks use them for the cache prefixes a config names. No torch here: importing the rules is cheap.
"""

from __future__ import annotations

import unicodedata

from shared import errors

MAX_KEY_BYTES = 1024  # the S3 limit
MAX_SEGMENT_BYTES = 250  # leaves room for ".ptr" within a 255-byte file name


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe object key, else raise InvalidInput naming the key and the broken rule.

    The rules keep keys meaningful as relative paths on every backend: a LocalStore maps them to files, so
    ``..``, absolute paths and odd characters could otherwise escape the root or collide."""
    rule = _broken_key_rule(key)
    if rule:
        raise errors.InvalidInput(f"invalid object key {key!r}: {rule}")
    return key


def _broken_key_rule(key: str) -> str | None:
    if not isinstance(key, str) or not key:
        return "a key must be a non-empty string"
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in key):
        return "control characters (including NUL) are not allowed"
    if "\\" in key:
        return "backslashes are not allowed; separate folders with '/'"
    if key.startswith("/"):
        return "a key must be relative (no leading '/')"
    if key.endswith("/"):
        return "a key must not end with '/' (that names a folder)"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"a key must be at most {MAX_KEY_BYTES} bytes in UTF-8"
    for segment in key.split("/"):
        if segment == "":
            return "empty path segments ('//') are not allowed"
        if segment in (".", ".."):
            return "'.' and '..' segments are not allowed"
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            return f"each '/'-separated segment must be at most {MAX_SEGMENT_BYTES} bytes"
    return None


def folder_prefix(prefix: str) -> str:
    """``""`` (everything) or the validated folder prefix ending in ``/``."""
    if prefix == "":
        return ""
    return validate_key(prefix[:-1] if prefix.endswith("/") else prefix) + "/"
