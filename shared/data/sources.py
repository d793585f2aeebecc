"""Where a dataset's files are (a local folder or an S3/MinIO prefix), and decoding one image safely.
"""

from __future__ import annotations

import io
import warnings as _warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image, ImageOps, UnidentifiedImageError

from shared.config.schema import DatasetConfig
from shared.errors import DatasetError, InvalidInput, Problem

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------------- sources
class ImageSource(Protocol):
    """Where a dataset's files are: a local folder or an S3/MinIO prefix."""

    label: str

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
    client: object  # minio.Minio
    bucket: str
    prefix: str

    @property
    def label(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _full(self, relpath: str) -> str:
        return f"{self.prefix.rstrip('/')}/{relpath}" if self.prefix else relpath

    def list_files(self) -> list[str]:
        base = self.prefix.rstrip("/") + "/" if self.prefix else ""
        names = (o.object_name for o in self.client.list_objects(self.bucket, prefix=base, recursive=True))
        return sorted(n[len(base):] for n in names if not n.endswith("/"))

    def read(self, relpath: str) -> bytes:
        resp = self.client.get_object(self.bucket, self._full(relpath))
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()


def open_source(ds: DatasetConfig, where: str) -> ImageSource:
    """The source of a dataset entry; a missing folder or unreachable bucket is a DatasetError naming it."""
    if ds.type == "aws":
        from shared.store.s3 import minio_client_from_aws_fields

        client, bucket = minio_client_from_aws_fields(ds.aws_fields)
        return S3Source(client, bucket, ds.aws_data_prefix)
    root = Path(ds.instance_data_dir or "")
    if not root.is_dir():
        raise DatasetError([Problem(where, f"instance_data_dir {str(root)!r} is not a folder; check the path "
                                    "(relative paths are read from the current directory)")])
    return LocalSource(root)


# ------------------------------------------------------------------------------------------------- images
def open_image(data: bytes, where: str, max_pixels: int) -> Image.Image:
    """Decode an image fully (RGB, EXIF orientation applied); raises InvalidInput naming ``where`` for a
    corrupt, truncated or non-image file, or one above ``max_pixels`` (checked before decoding)."""
    img = _open_header(data, where, max_pixels)
    try:
        img.load()
        return ImageOps.exif_transpose(img).convert("RGB")
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
        raise InvalidInput(f"{where}: not a readable image ({type(e).__name__}); remove it or replace it with a "
                           "PNG/JPEG/WebP file") from None
    w, h = img.size
    if w * h > max_pixels:
        raise InvalidInput(f"{where}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels} "
                           "(max_image_pixels; a guard against decompression bombs); downscale the image or raise "
                           "max_image_pixels")
    if w < 1 or h < 1:
        raise InvalidInput(f"{where}: image has no pixels")
    return img
