"""What the store tests share: key cases, credentials for the test S3 server (moto in its own process), and a
MinioStore on a fresh bucket, so tests share the server but not state."""

from __future__ import annotations

import hashlib
import uuid
from urllib.parse import urlsplit

from s3server import ACCESS_KEY, SECRET_KEY

from shared.store.s3 import MinioStore

S3_ENV = {"EDITTUNER_S3_ACCESS_KEY": ACCESS_KEY, "EDITTUNER_S3_SECRET_KEY": SECRET_KEY}
BAD_KEYS = [
    ("", "non-empty"),
    ("/abs/key", "leading '/'"),
    ("a/../b", "'..'"),
    ("..", "'..'"),
    ("a/./b", "'.'"),
    ("a//b", "empty path segments"),
    ("a\\b", "backslashes"),
    ("a/b\x00", "control characters"),
    ("a/\nb", "control characters"),
    ("a/b\x7f", "control characters"),
    ("folder/", "must not end with '/'"),
    ("x" * 251, "at most 250 bytes"),
    ("a/" * 600 + "b", "at most 1024 bytes"),
]


def new_minio_store(endpoint_url: str, **kwargs: object) -> MinioStore:
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    return MinioStore(urlsplit(endpoint_url).netloc, ACCESS_KEY, SECRET_KEY, bucket, retry_s=0, **kwargs)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
