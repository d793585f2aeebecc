"""MinioStore on a real S3 server: metadata, corruption, errors; store URLs, credentials and dataset clients."""

from __future__ import annotations

import io
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from s3server import ACCESS_KEY, SECRET_KEY, free_port
from stores import S3_ENV, new_minio_store, sha256_of

from shared import errors
from shared.store.local import LocalStore
from shared.store.s3 import MinioStore, minio_client_from_aws_fields, parse_endpoint_url, resolve_s3_credentials
from shared.store.url import open_store


@pytest.fixture
def minio_store(s3_server: str) -> MinioStore:
    return new_minio_store(s3_server)


# --- MinioStore: metadata, corruption, errors ----------------------------------------------------------------


def test_minio_records_sha_in_user_metadata(minio_store: MinioStore) -> None:
    minio_store.put_bytes("a/k", b"payload")
    obj = minio_store.client.stat_object(minio_store.bucket, "a/k")
    assert {k.lower(): v for k, v in obj.metadata.items()}["x-amz-meta-sha256"] == sha256_of(b"payload")


def test_minio_overwritten_bytes_with_stale_metadata_are_detected(minio_store: MinioStore, tmp_path: Path) -> None:
    minio_store.put_bytes("cache/text/ds/x.safetensors", b"original")
    stale = {"sha256": sha256_of(b"original")}
    minio_store.client.put_object(
        minio_store.bucket, "cache/text/ds/x.safetensors", io.BytesIO(b"tampered"), 8, metadata=stale
    )
    assert minio_store.stat("cache/text/ds/x.safetensors").sha256 == sha256_of(b"original")  # metadata looks fine
    with pytest.raises(errors.IntegrityError, match="'cache/text/ds/x.safetensors'.*corrupt"):
        minio_store.get_bytes("cache/text/ds/x.safetensors")
    dst = tmp_path / "x.safetensors"
    with pytest.raises(errors.IntegrityError, match="corrupt"):
        minio_store.get_file("cache/text/ds/x.safetensors", dst)
    assert list(tmp_path.iterdir()) == []


def test_minio_object_without_sha_metadata_is_rejected(minio_store: MinioStore) -> None:
    minio_store.client.put_object(minio_store.bucket, "foreign.png", io.BytesIO(b"png"), 3)
    assert minio_store.exists("foreign.png") and minio_store.list() == ["foreign.png"]
    with pytest.raises(errors.IntegrityError, match="'foreign.png'.*no recorded sha256"):
        minio_store.get_bytes("foreign.png")


def test_minio_bucket_creation_tolerates_existing_bucket(minio_store: MinioStore, s3_server: str) -> None:
    minio_store.put_bytes("k", b"v")
    again = MinioStore(urlsplit(s3_server).netloc, ACCESS_KEY, SECRET_KEY, minio_store.bucket)
    assert again.get_bytes("k") == b"v"


def test_minio_closed_port_is_unavailable_quickly() -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(errors.Unavailable, match=f"http://127.0.0.1:{port} is unreachable.*check that MinIO"):
        MinioStore(f"127.0.0.1:{port}", ACCESS_KEY, SECRET_KEY, "edittuner", connect_timeout_s=0.5, retry_s=0)
    assert time.monotonic() - start < 5


def test_minio_invalid_bucket_name() -> None:
    with pytest.raises(errors.InvalidInput, match="invalid bucket name 'Bad_Bucket'"):
        MinioStore("127.0.0.1:1", ACCESS_KEY, SECRET_KEY, "Bad_Bucket")


# --- URLs, credentials, dataset clients ----------------------------------------------------------------------


def test_open_store_local_forms(tmp_path: Path) -> None:
    assert open_store(None, default_root=tmp_path / "d").root == tmp_path / "d"
    assert open_store(str(tmp_path / "p")).root == tmp_path / "p"
    assert open_store(f"file://{tmp_path}/f%20x").root == tmp_path / "f x"
    default = open_store(None, env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert isinstance(default, LocalStore) and default.root == tmp_path / "xdg" / "edittuner" / "store"


def test_open_store_s3_forms(s3_server: str) -> None:
    host = urlsplit(s3_server).netloc
    env = {**S3_ENV, "EDITTUNER_S3_ENDPOINT": s3_server}
    for url, bucket in [
        ("s3://bkt-one", "bkt-one"),
        (f"minio://{host}/bkt-two", "bkt-two"),
        (f"http://{host}/bkt-three/", "bkt-three"),
        (f"minio://{host}", "edittuner"),
    ]:
        store = open_store(url, env=env)
        assert isinstance(store, MinioStore) and (store.endpoint, store.bucket, store.secure) == (host, bucket, False)
        store.put_bytes("k", url.encode())
        assert store.get_bytes("k") == url.encode()


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://host/bucket",
        "s3://",
        "s3://bucket/extra",
        "minio://host:9000/a/b",
        "file://relative/path",
        "s3://Bad_Bucket",
        "minio://",
        "http://host:9000/x",
    ],
)
def test_open_store_rejects_bad_urls_naming_them(url: str) -> None:
    with pytest.raises(errors.InvalidInput) as info:
        open_store(url, env=S3_ENV)
    assert (repr(url) in str(info.value)) if url else "empty" in str(info.value)


def test_open_store_needs_credentials_for_s3() -> None:
    with pytest.raises(errors.InvalidInput, match="needs credentials.*EDITTUNER_S3_ACCESS_KEY"):
        open_store("minio://127.0.0.1:9/bkt", env={})


def test_credentials_precedence() -> None:
    env = {
        "MINIO_ROOT_USER": "mu",
        "MINIO_ROOT_PASSWORD": "mp",
        "AWS_ACCESS_KEY_ID": "au",
        "AWS_SECRET_ACCESS_KEY": "ap",
    }
    assert resolve_s3_credentials("u", "p", {**env, **S3_ENV}) == ("u", "p")
    assert resolve_s3_credentials(None, None, {**env, **S3_ENV}) == (ACCESS_KEY, SECRET_KEY)
    assert resolve_s3_credentials(None, None, env) == ("mu", "mp")
    aws_only = {"AWS_ACCESS_KEY_ID": "au", "AWS_SECRET_ACCESS_KEY": "ap"}
    assert resolve_s3_credentials(None, None, aws_only) == ("au", "ap")
    assert resolve_s3_credentials(None, None, {}) is None
    with pytest.raises(errors.InvalidInput, match="EDITTUNER_S3_SECRET_KEY is missing"):
        resolve_s3_credentials(None, None, {"EDITTUNER_S3_ACCESS_KEY": "x", **env})
    with pytest.raises(errors.InvalidInput, match="secret_key argument is missing"):
        resolve_s3_credentials("u", None, env)


def test_parse_endpoint_url() -> None:
    assert parse_endpoint_url("http://127.0.0.1:9000") == ("127.0.0.1:9000", False)
    assert parse_endpoint_url("https://s3.example.com/") == ("s3.example.com", True)
    for bad in ["127.0.0.1:9000", "ftp://h", "http://h:9000/prefix", "http://u:p@h:9000", "http://"]:
        with pytest.raises(errors.InvalidInput, match="aws_endpoint_url"):
            parse_endpoint_url(bad, "aws_endpoint_url")


def test_minio_client_from_aws_fields_reads_foreign_images(minio_store: MinioStore, s3_server: str) -> None:
    minio_store.client.put_object(minio_store.bucket, "images/a.png", io.BytesIO(b"A"), 1)
    fields = {
        "aws_bucket_name": minio_store.bucket,
        "aws_endpoint_url": s3_server,
        "aws_region_name": "us-east-1",
        "aws_access_key_id": ACCESS_KEY,
        "aws_secret_access_key": SECRET_KEY,
    }
    client, bucket = minio_client_from_aws_fields(fields, env={})
    assert bucket == minio_store.bucket
    assert [o.object_name for o in client.list_objects(bucket, prefix="images/", recursive=True)] == ["images/a.png"]
    response = client.get_object(bucket, "images/a.png")
    try:
        assert response.read() == b"A"
    finally:
        response.close()
        response.release_conn()


def test_minio_client_from_aws_fields_rejects_bad_fields() -> None:
    with pytest.raises(errors.InvalidInput, match="aws_bucket_name"):
        minio_client_from_aws_fields({"aws_endpoint_url": "http://127.0.0.1:9000"}, env={})
    with pytest.raises(errors.InvalidInput, match="aws_endpoint_url 'localhost:9000'"):
        minio_client_from_aws_fields({"aws_bucket_name": "b", "aws_endpoint_url": "localhost:9000"}, env={})
    assert minio_client_from_aws_fields({"aws_bucket_name": "imgs"}, env={})[1] == "imgs"  # AWS, anonymous
