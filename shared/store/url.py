"""Open the store a URL names: a directory (the embedded default), ``file://``, ``s3://``, ``minio://`` or
``http(s)://``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from shared import errors
from shared.store.base import DEFAULT_BUCKET, ObjectStore
from shared.store.local import LocalStore
from shared.store.s3 import (
    AWS_ENDPOINT,
    BUCKET_NAME,
    MinioStore,
    parse_endpoint_url,
    resolve_s3_credentials,
    retry_budget,
)


def default_local_root(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/edittuner/store`` (``~/.cache/edittuner/store``): where the embedded store lives."""
    env = os.environ if env is None else env
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edittuner" / "store"


def open_store(
    url: str | None,
    *,
    default_root: Path | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ObjectStore:
    """Open the store a URL names.

    ``None`` → LocalStore at ``default_root`` (or ``default_local_root()``); a path or ``file:///abs/path`` →
    LocalStore; ``s3://bucket`` → MinioStore at ``$EDITTUNER_S3_ENDPOINT`` (default AWS);
    ``minio://host:port[/bucket]`` (plain HTTP), ``http(s)://host:port[/bucket]`` → MinioStore (bucket
    defaults to ``edittuner``). Credentials: arguments, else environment (see ``resolve_s3_credentials``)."""
    env = os.environ if env is None else env
    if url is None:
        return LocalStore(default_root or default_local_root(env))
    if not url.strip():
        raise errors.InvalidInput("the store URL is empty: give a directory, file:///path, s3://b or minio://host/b")
    if "://" not in url:
        return LocalStore(Path(url))
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise errors.InvalidInput(f"store URL {url!r}: a file URL needs an absolute path: file:///srv/edittuner")
        return LocalStore(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        if not parts.netloc or parts.path.strip("/"):
            raise errors.InvalidInput(f"store URL {url!r}: write s3://<bucket> (set EDITTUNER_S3_ENDPOINT for MinIO)")
        endpoint_url = env.get("EDITTUNER_S3_ENDPOINT") or AWS_ENDPOINT
        endpoint, secure = parse_endpoint_url(endpoint_url, "EDITTUNER_S3_ENDPOINT")
        bucket = parts.netloc
    elif parts.scheme in ("minio", "http", "https"):
        endpoint, secure, bucket = parts.netloc, parts.scheme == "https", parts.path.strip("/") or DEFAULT_BUCKET
        if not parts.hostname or "/" in bucket or parts.query or parts.username:
            raise errors.InvalidInput(f"store URL {url!r}: write {parts.scheme}://host:port/<bucket>")
    else:
        raise errors.InvalidInput(
            f"store URL {url!r}: unknown scheme {parts.scheme!r}; use a path, file://, s3://, minio:// or http(s)://"
        )
    if not BUCKET_NAME.match(bucket):
        raise errors.InvalidInput(f"store URL {url!r}: invalid bucket name {bucket!r} (use 3-63 of a-z 0-9 . -)")
    creds = resolve_s3_credentials(access_key, secret_key, env)
    if creds is None:
        raise errors.InvalidInput(
            f"store URL {url!r} needs credentials: set EDITTUNER_S3_ACCESS_KEY and EDITTUNER_S3_SECRET_KEY"
        )
    return MinioStore(endpoint, creds[0], creds[1], bucket, secure=secure, region=region, retry_s=retry_budget(env))
