"""Where a dataset's files are (a local folder or an S3/MinIO prefix), and decoding one image safely."""

from __future__ import annotations

import io
import warnings as _warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from PIL import Image, ImageOps, UnidentifiedImageError

from shared import deadline, errors
from shared.config.schema import DatasetConfig
from shared.errors import DatasetError, InvalidInput, Problem

if TYPE_CHECKING:
    from urllib3 import BaseHTTPResponse

    from shared.store.base import ObjectStore

_T = TypeVar("_T")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------------- sources
class ImageSource(Protocol):
    """Where a dataset's files are: a local folder or an S3/MinIO prefix."""

    @property
    def label(self) -> str: ...

    def list_files(self) -> list[str]: ...

    def read(self, relpath: str) -> bytes: ...


@dataclass
class LocalSource:
    root: Path

    @property
    def label(self) -> str:
        return str(self.root)

    def list_files(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def read(self, relpath: str) -> bytes:
        return (self.root / relpath).read_bytes()


@dataclass
class S3Source:
    """A SimpleTuner ``type: aws`` dataset: images under ``prefix`` in someone's bucket (no EditTuner sha256).
    Reads retry transient faults like the store does; a bucket that stays unreachable, is missing or refuses
    access is a DatasetError naming bucket and endpoint."""

    client: Any  # minio.Minio
    bucket: str
    prefix: str
    endpoint: str = ""  # for messages: http(s)://host:port
    retry_s: float = 0.0

    @property
    def label(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _full(self, relpath: str) -> str:
        return f"{self.prefix.rstrip('/')}/{relpath}" if self.prefix else relpath

    def list_files(self) -> list[str]:
        base = self.prefix.rstrip("/") + "/" if self.prefix else ""

        def listing() -> list[str]:
            names = (o.object_name for o in self.client.list_objects(self.bucket, prefix=base, recursive=True))
            return sorted(n[len(base) :] for n in names if not n.endswith("/"))

        return self._call(listing, f"listing {self.label}")

    def read(self, relpath: str) -> bytes:
        def get() -> bytes:
            resp: BaseHTTPResponse = self.client.get_object(self.bucket, self._full(relpath))
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call(get, f"reading {self.label}/{relpath}")

    def _call(self, operation: Callable[[], _T], what: str) -> _T:
        from minio.error import S3Error

        from shared.store.s3 import is_transient, retrying

        where = f"bucket {self.bucket!r} at {self.endpoint or 'its endpoint'}"
        budget_s, bounded = deadline.budget(self.retry_s)  # inside a call: ends before its client's deadline
        try:
            return retrying(budget_s, where, hard=bounded)(operation)
        except S3Error as err:
            hint = {
                "NoSuchBucket": "check aws_bucket_name",
                "NoSuchKey": "the file is gone: encode again",
                "AccessDenied": "check aws_access_key_id / aws_secret_access_key",
            }.get(err.code or "", "")
            raise DatasetError(
                [
                    Problem(
                        self.label,
                        f"{what}: {where} answered {err.code} ({err.message})" + (f"; {hint}" if hint else ""),
                    )
                ]
            ) from None
        except Exception as err:
            if not is_transient(err):
                raise
            raise DatasetError(
                [
                    Problem(
                        self.label,
                        f"{what}: {where} is unreachable ({type(err).__name__}), "
                        f"retried for {self.retry_s:g} s; check aws_endpoint_url and that the "
                        "server is up",
                    )
                ]
            ) from None


@dataclass
class StoreSource:
    """A dataset a client uploaded into the store (``type: store``): its manifest maps names to stored files."""

    store: ObjectStore
    upload_id: str

    def __post_init__(self) -> None:
        from shared.store.uploads import read_manifest

        self.entries = read_manifest(self.store, self.upload_id)

    @property
    def label(self) -> str:
        return f"upload {self.upload_id!r}"

    def list_files(self) -> list[str]:
        return sorted(self.entries)

    def read(self, relpath: str) -> bytes:
        from shared.store.uploads import blob_key

        return self.store.get_bytes(blob_key(self.entries[relpath].sha256))


def open_source(ds: DatasetConfig, where: str, store: ObjectStore | None = None) -> ImageSource:
    """The source of a dataset entry; a missing folder, upload or unreachable bucket is a DatasetError naming it.
    ``store``: where ``type: store`` datasets (uploads) are read from."""
    if ds.type == "store":
        if store is None:
            raise DatasetError(
                [
                    Problem(
                        where,
                        "an uploaded dataset (type 'store') is read from the services' "
                        "store: run it through the services, or with --store",
                    )
                ]
            )
        try:
            return StoreSource(store, ds.store_upload or "")
        except (errors.NotFound, errors.InvalidInput) as err:
            raise DatasetError([Problem(where, str(err))]) from None
    if ds.type == "aws":
        from shared.store.s3 import AWS_ENDPOINT, minio_client_from_aws_fields, retry_budget

        client, bucket = minio_client_from_aws_fields(ds.aws_fields)
        return S3Source(client, bucket, ds.aws_data_prefix, ds.aws_endpoint_url or AWS_ENDPOINT, retry_budget())
    root = Path(ds.instance_data_dir or "")
    if not root.is_dir():
        raise DatasetError(
            [
                Problem(
                    where,
                    f"instance_data_dir {str(root)!r} is not a folder; check the path "
                    "(relative paths are read from the current directory)",
                )
            ]
        )
    return LocalSource(root)


# ------------------------------------------------------------------------------------------------- images
def open_image(data: bytes, where: str, max_pixels: int, mode: str = "RGB") -> Image.Image:
    """Decode an image fully (in ``mode``: RGB, or RGBA for Qwen-Image-2.1's RGBA VAE; EXIF orientation applied);
    raises InvalidInput naming ``where`` for a corrupt, truncated or non-image file, or one above ``max_pixels``
    (checked before decoding)."""
    img = _open_header(data, where, max_pixels)
    try:
        img.load()
        return ImageOps.exif_transpose(img).convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidInput(f"{where}: image is corrupt or truncated ({e}); re-export or remove it") from None


def _open_header(data: bytes, where: str, max_pixels: int) -> Image.Image:
    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own limit decides, below
            try:
                img = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InvalidInput(
            f"{where}: not a readable image ({type(e).__name__}); remove it or replace it with a PNG/JPEG/WebP file"
        ) from None
    w, h = img.size
    if w * h > max_pixels:
        raise InvalidInput(
            f"{where}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels} "
            "(max_image_pixels; a guard against decompression bombs); downscale the image or raise "
            "max_image_pixels"
        )
    if w < 1 or h < 1:
        raise InvalidInput(f"{where}: image has no pixels")
    return img
