"""The MinIO/S3 store (``minio`` SDK): the sha256 lives in the object's user metadata (``x-amz-meta-sha256``),
and an S3 PUT is atomic. Also the endpoint and credential rules shared with SimpleTuner's ``type: aws`` datasets.

Transient faults — refused or reset connections, timeouts, 5xx answers, SlowDown — are retried by tenacity with
exponential backoff and jitter for every operation, for a budget of ``retry_s`` seconds (``EDITTUNER_STORE_RETRY_S``,
default 120): a run rides out a store restart or a network blip. Past the budget the operation fails
``Unavailable`` naming the endpoint. urllib3 itself does not retry (one policy, not two nested ones). Inside a
call a client is waiting for (``shared.deadline``), the retries stop before that client's deadline: the call is
answered ``Unavailable`` naming the endpoint, with a retry hint, rather than left to run out.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import certifi
import tenacity
import urllib3
from minio import Minio
from minio.error import MinioException, S3Error, ServerError

from shared import deadline, errors
from shared.store.base import DEFAULT_BUCKET, ObjectInfo, ObjectStore, folder_prefix, mismatch_error, validate_key
from shared.store.files import CHUNK, sha256_file, write_file_verified

log = logging.getLogger(__name__)
_T = TypeVar("_T")

BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CREDENTIAL_ENV = (
    ("EDITTUNER_S3_ACCESS_KEY", "EDITTUNER_S3_SECRET_KEY"),
    ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"),
    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
)
AWS_ENDPOINT = "https://s3.amazonaws.com"
# minio's own defaults (5 min connect timeout, 5 retries) take minutes to report a store that is down; each attempt
# here gives up quickly and the retry policy below decides how long to keep trying.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0  # between two reads of one response, not for the whole object
RETRY_S = 120.0
# S3 error codes that say "try again" (the others — NoSuchKey, AccessDenied, ... — are answers, not faults).
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "OperationAborted",
    "XMinioServerNotInitialized",
    "XMinioStorageFull",
}


def retry_budget(env: Mapping[str, str] | None = None) -> float:
    """``EDITTUNER_STORE_RETRY_S`` (seconds a store operation keeps retrying transient faults), default 120."""
    raw = (os.environ if env is None else env).get("EDITTUNER_STORE_RETRY_S", "").strip()
    try:
        value = float(raw) if raw else RETRY_S
    except ValueError:
        raise errors.InvalidInput(f"EDITTUNER_STORE_RETRY_S={raw!r} is not a number of seconds") from None
    if value < 0:
        raise errors.InvalidInput(f"EDITTUNER_STORE_RETRY_S={raw!r} must be 0 or more seconds")
    return value


def is_transient(err: BaseException) -> bool:
    """A fault worth retrying: the connection failed or broke, the server was slow or said 5xx."""
    if isinstance(err, S3Error):
        return err.code in _TRANSIENT_CODES
    if isinstance(err, ServerError):
        return err.status_code >= 500 or err.status_code == 429
    return isinstance(err, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def retrying(budget_s: float, where: str, *, hard: bool = False) -> tenacity.Retrying:
    """The retry policy of every store and dataset-bucket operation: exponential backoff with jitter (0.2 s
    doubling up to 5 s) while ``is_transient``, for ``budget_s`` seconds in all, then the last error is raised.
    ``hard``: no attempt starts after ``budget_s`` (a client's deadline), rather than none after it ran out."""

    def note(state: tenacity.RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: %s; retrying (attempt %d, %.0f s of %.0f s)",
            where,
            type(err).__name__,
            state.attempt_number,
            state.seconds_since_start or 0.0,
            budget_s,
        )

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        stop=tenacity.stop_before_delay(budget_s) if hard else tenacity.stop_after_delay(budget_s),
        wait=tenacity.wait_exponential_jitter(initial=0.2, max=5.0),
        reraise=True,
        before_sleep=note,
    )


def _http_client(connect_timeout_s: float, read_timeout_s: float) -> urllib3.PoolManager:
    """An HTTP client for minio with our timeouts, no retries of its own, and minio's default TLS setup."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=0, redirect=0, raise_on_status=False),
    )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Header lookup that ignores case whatever the mapping (servers differ in how they spell metadata)."""
    name = name.lower()
    return next((v for k, v in headers.items() if k.lower() == name), None)


class MinioStore(ObjectStore):
    """Objects in one MinIO/S3 bucket, created if missing. ``endpoint`` is ``host:port`` (no scheme)."""

    def __init__(
        self,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        bucket: str = DEFAULT_BUCKET,
        secure: bool = False,
        region: str | None = None,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
        retry_s: float = RETRY_S,
    ):
        self.endpoint, self.bucket, self.secure, self.region = endpoint, bucket, secure, region
        self.retry_s = retry_s
        if not BUCKET_NAME.match(bucket):
            raise errors.InvalidInput(f"invalid bucket name {bucket!r}: use 3-63 lowercase letters, digits, '.' or '-'")
        try:
            http = _http_client(connect_timeout_s, read_timeout_s)
            self.client = Minio(endpoint, access_key, secret_key, secure=secure, region=region, http_client=http)
        except ValueError as err:
            raise errors.InvalidInput(f"invalid object store endpoint {endpoint!r}: {err}") from err
        self.ensure_bucket()

    def describe(self) -> str:
        return f"s3 bucket '{self.bucket}' at {'https' if self.secure else 'http'}://{self.endpoint}"

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists; another process creating it at the same time is fine."""

        def ensure() -> None:
            if self.client.bucket_exists(self.bucket):
                return
            try:
                self.client.make_bucket(self.bucket, location=self.region)
            except S3Error:
                if not self.client.bucket_exists(self.bucket):
                    raise

        self._do(ensure)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo:
        sha = hashlib.sha256(data).hexdigest()
        self._do(
            lambda: self.client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type, metadata={"sha256": sha}
            ),
            validate_key(key),
        )
        return ObjectInfo(key, len(data), sha, content_type)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> ObjectInfo:
        """Hashes the file, then uploads it (multipart for big files): S3 takes the metadata before the bytes."""
        validate_key(key)
        if not Path(path).is_file():
            raise errors.NotFound(f"cannot store '{key}': local file {path} does not exist")
        sha = sha256_file(Path(path))
        self._do(
            lambda: self.client.fput_object(self.bucket, key, str(path), content_type, metadata={"sha256": sha}), key
        )
        return ObjectInfo(key, Path(path).stat().st_size, sha, content_type)

    def get_bytes(self, key: str) -> bytes:
        def read() -> tuple[bytes, str]:
            with self._response(key) as response:
                return response.read(), self._recorded_sha(key, response.headers)

        data, expected = self._do(read, validate_key(key))
        sha = hashlib.sha256(data).hexdigest()
        if sha != expected:
            raise mismatch_error(key, self.describe(), expected, sha)
        return data

    def get_file(self, key: str, path: Path) -> None:
        def download() -> None:  # a broken stream starts over: the temp file of the failed try is removed
            with self._response(key) as response:
                expected = self._recorded_sha(key, response.headers)
                write_file_verified(Path(path), response.stream(CHUNK), expected, key, self.describe())

        self._do(download, validate_key(key))

    def stat(self, key: str) -> ObjectInfo:
        obj = self._do(lambda: self.client.stat_object(self.bucket, key), validate_key(key))
        content_type = obj.content_type or "application/octet-stream"
        return ObjectInfo(key, int(obj.size or 0), self._recorded_sha(key, obj.metadata or {}), content_type)

    def exists(self, key: str) -> bool:
        def probe() -> bool:
            try:
                self.client.stat_object(self.bucket, key)
            except S3Error as err:
                if err.code == "NoSuchKey":
                    return False
                raise
            return True

        return self._do(probe, validate_key(key))

    def list(self, prefix: str = "") -> list[str]:
        folder = folder_prefix(prefix)

        def listing() -> list[str]:
            objects = self.client.list_objects(self.bucket, prefix=folder or None, recursive=True)
            return sorted(o.object_name for o in objects if o.object_name and not o.is_dir)

        return self._do(listing)

    def delete(self, key: str) -> None:
        self._do(lambda: self.client.remove_object(self.bucket, key), validate_key(key))

    def _do(self, operation: Callable[[], _T], key: str | None = None) -> _T:
        """``operation()`` with the retry policy, its final failure translated to an EditTunerError. Serving a
        call with a deadline, the retries end before it (``shared.deadline.budget``)."""
        budget_s, bounded = deadline.budget(self.retry_s)
        started = time.monotonic()
        try:
            with self._translated(key, budget_s):
                return retrying(budget_s, self.describe(), hard=bounded)(operation)
        except errors.Unavailable as err:
            if not bounded:
                raise
            raise errors.Unavailable(
                f"{err}; this call gave up after {time.monotonic() - started:.1f} s to answer before its deadline: "
                f"retry in {deadline.RETRY_HINT_S:g} s",
                retry_after_s=deadline.RETRY_HINT_S,
            ) from err.__cause__

    def _recorded_sha(self, key: str, headers: Mapping[str, str]) -> str:
        sha = _header(headers, "x-amz-meta-sha256")
        if not sha:
            raise errors.IntegrityError(
                f"object '{key}' in {self.describe()} has no recorded sha256 (x-amz-meta-sha256), so it cannot be "
                "verified: it was not written by EditTuner; rewrite it through the store"
            )
        return sha

    @contextmanager
    def _response(self, key: str) -> Iterator[urllib3.BaseHTTPResponse]:
        response = self.client.get_object(self.bucket, key)
        try:
            yield response
        finally:
            response.close()
            response.release_conn()

    @contextmanager
    def _translated(self, key: str | None = None, retried_s: float | None = None) -> Iterator[None]:
        """Turn minio/urllib3 exceptions into EditTuner errors that say what to check."""
        retried_s = self.retry_s if retried_s is None else retried_s
        try:
            yield
        except S3Error as err:
            raise self._s3_error(err, key, retried_s) from err
        except (urllib3.exceptions.HTTPError, MinioException, ConnectionError, TimeoutError) as err:
            retried = f" (retried for {retried_s:.3g} s, EDITTUNER_STORE_RETRY_S)" if retried_s > 0 else ""
            raise errors.Unavailable(
                f"object store at {'https' if self.secure else 'http'}://{self.endpoint} is unreachable or not "
                f"an S3 server ({type(err).__name__}: {err}){retried}; check that MinIO is running and that the "
                "endpoint (EDITTUNER_S3_ENDPOINT or the store URL) is right"
            ) from err

    def _s3_error(self, err: S3Error, key: str | None, retried_s: float) -> errors.EditTunerError:
        where = self.describe()
        if err.code == "NoSuchKey" and key is not None:
            return errors.NotFound(f"object '{key}' not found in {where}")
        if err.code == "NoSuchBucket":
            return errors.NotFound(f"{where} does not exist; create it or let the store create it on start")
        if err.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return errors.Unavailable(
                f"{where} refused access ({err.code}); check EDITTUNER_S3_ACCESS_KEY / EDITTUNER_S3_SECRET_KEY"
            )
        subject = f"'{key}' in {where}" if key else where
        if err.code in _TRANSIENT_CODES:
            return errors.Unavailable(
                f"{subject} kept failing ({err.code}: {err.message}) for {retried_s:.3g} s; "
                "is the object store overloaded or restarting?"
            )
        return errors.EditTunerError(f"object store error on {subject}: {err.code}: {err.message}")


def parse_endpoint_url(url: str, what: str = "endpoint") -> tuple[str, bool]:
    """``http://127.0.0.1:9000`` → ``("127.0.0.1:9000", False)``: the host:port and TLS flag minio wants."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.InvalidInput(f"{what} {url!r} must be an http(s):// URL with a host, e.g. http://127.0.0.1:9000")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise errors.InvalidInput(f"{what} {url!r} must be only scheme://host[:port], without a path or credentials")
    return parts.netloc, parts.scheme == "https"


def resolve_s3_credentials(
    access_key: str | None, secret_key: str | None, env: Mapping[str, str]
) -> tuple[str, str] | None:
    """Explicit arguments win; else the first environment pair that is set (EDITTUNER_S3_*, MINIO_ROOT_*,
    AWS_*). A half-set pair is an error rather than silently mixing two sources."""
    pairs = [("the access_key argument", "the secret_key argument", access_key, secret_key)]
    pairs += [(a, s, env.get(a), env.get(s)) for a, s in _CREDENTIAL_ENV]
    for access_name, secret_name, access, secret in pairs:
        if access and secret:
            return access, secret
        if access or secret:
            missing = secret_name if access else access_name
            raise errors.InvalidInput(f"S3 credentials are half set: {missing} is missing")
    return None


def minio_client_from_aws_fields(fields: Mapping[str, Any], env: Mapping[str, str] | None = None) -> tuple[Minio, str]:
    """A raw minio client and bucket name from a SimpleTuner ``type: aws`` dataset entry, for listing and
    reading source images (which carry no EditTuner sha256). Without keys it reads anonymously."""
    bucket = fields.get("aws_bucket_name")
    if not bucket or not isinstance(bucket, str):
        raise errors.InvalidInput("an aws dataset needs aws_bucket_name (the bucket holding its images)")
    host, secure = parse_endpoint_url(fields.get("aws_endpoint_url") or AWS_ENDPOINT, "aws_endpoint_url")
    creds = resolve_s3_credentials(
        fields.get("aws_access_key_id"), fields.get("aws_secret_access_key"), os.environ if env is None else env
    )
    access, secret = creds or (None, None)
    client = Minio(
        host,
        access,
        secret,
        secure=secure,
        region=fields.get("aws_region_name") or None,
        http_client=_http_client(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
    )
    return client, bucket
