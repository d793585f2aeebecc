"""Datasets in an S3 bucket (SimpleTuner's type 'aws') encoded into a MinIO store, against a real S3 server."""

from __future__ import annotations

import json
import uuid
from urllib.parse import urlsplit

import pytest
from minio import Minio
from s3server import ACCESS_KEY, SECRET_KEY

from shared.config.loading import load_run_config
from shared.data.pairing import pair_datasets
from shared.data.synthetic import write_configs, write_dataset
from shared.encode.encoder import DatasetEncoder
from shared.errors import DatasetError
from shared.store.s3 import MinioStore


@pytest.fixture
def s3_dataset(tmp_path, s3_server, tiny_models):
    """A generated dataset uploaded to its own bucket, and configs whose datasets are type 'aws'."""
    root = write_dataset(tmp_path / "data", n=3, references=2)
    client = Minio(urlsplit(s3_server).netloc, ACCESS_KEY, SECRET_KEY, secure=False)
    bucket = f"images-{uuid.uuid4().hex[:12]}"
    client.make_bucket(bucket)
    for f in sorted(root.rglob("*")):
        if f.is_file():
            client.fput_object(bucket, f"pairs/{f.relative_to(root).as_posix()}", str(f))
    cfg, data = write_configs(tmp_path / "cfg", root, tiny_models("edit-v2"), "edit-v2", 2)
    entries = json.loads(data.read_text())
    for e in entries:
        folder = e.pop("instance_data_dir").rsplit("/", 1)[1]
        e.update(
            type="aws",
            aws_bucket_name=bucket,
            aws_data_prefix=f"pairs/{folder}",
            aws_endpoint_url=s3_server,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            aws_region_name="us-east-1",
        )
    data.write_text(json.dumps(entries))
    return cfg, client, bucket


def test_aws_datasets_pair_and_encode_into_minio_store(s3_dataset, s3_server):
    cfg, client, bucket = s3_dataset
    run = load_run_config(cfg)
    [ds], warnings = pair_datasets(run)
    assert warnings == [] and [s.key for s in ds.samples] == ["0000", "0001", "0002"]
    assert ds.samples[0].caption and ds.sources["demo-images"].label == f"s3://{bucket}/pairs/images"
    store = MinioStore(urlsplit(s3_server).netloc, ACCESS_KEY, SECRET_KEY, f"cache-{uuid.uuid4().hex[:12]}")
    first = DatasetEncoder(run, store).encode()
    assert (first.encoded, first.cached, first.failed) == (12, 0, 0)
    second = DatasetEncoder(run, store).encode()
    assert (second.encoded, second.cached) == (0, 12)
    tensors, meta = store.get_tensors("cache/vae/demo-reference-b/0001.safetensors")
    assert tensors["latents"].shape[0] == 16 and len(meta["cache_key"]) == 64
    manifest = store.get_json("cache/text/demo-images/manifest.json")
    assert sorted(manifest["entries"]) == ["0000", "0001", "0002"]


def test_missing_reference_in_bucket_is_named(s3_dataset):
    cfg, client, bucket = s3_dataset
    client.remove_object(bucket, "pairs/reference_a/0002.png")
    with pytest.raises(DatasetError) as e:
        pair_datasets(load_run_config(cfg))
    assert f"s3://{bucket}/pairs/reference_a" in str(e.value) and "0002.png" in str(e.value)
