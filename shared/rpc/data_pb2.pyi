from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatFilesRequest(_message.Message):
    __slots__ = ("paths",)
    PATHS_FIELD_NUMBER: _ClassVar[int]
    paths: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, paths: _Optional[_Iterable[str]] = ...) -> None: ...

class StatFilesResponse(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[ServerFile]
    def __init__(self, files: _Optional[_Iterable[_Union[ServerFile, _Mapping]]] = ...) -> None: ...

class ServerFile(_message.Message):
    __slots__ = ("path", "readable", "size", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    READABLE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    readable: bool
    size: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., readable: _Optional[bool] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadEntry(_message.Message):
    __slots__ = ("path", "size", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class PlanUploadRequest(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[UploadEntry]
    def __init__(self, files: _Optional[_Iterable[_Union[UploadEntry, _Mapping]]] = ...) -> None: ...

class PlanUploadResponse(_message.Message):
    __slots__ = ("missing_sha256",)
    MISSING_SHA256_FIELD_NUMBER: _ClassVar[int]
    missing_sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, missing_sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class UploadFileRequest(_message.Message):
    __slots__ = ("file", "chunk")
    FILE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    file: UploadEntry
    chunk: bytes
    def __init__(self, file: _Optional[_Union[UploadEntry, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadFileResponse(_message.Message):
    __slots__ = ("key", "written")
    KEY_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    key: str
    written: bool
    def __init__(self, key: _Optional[str] = ..., written: _Optional[bool] = ...) -> None: ...

class CommitUploadRequest(_message.Message):
    __slots__ = ("upload_id", "files")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    files: _containers.RepeatedCompositeFieldContainer[UploadEntry]
    def __init__(self, upload_id: _Optional[str] = ..., files: _Optional[_Iterable[_Union[UploadEntry, _Mapping]]] = ...) -> None: ...

class CommitUploadResponse(_message.Message):
    __slots__ = ("manifest_key", "files")
    MANIFEST_KEY_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    manifest_key: str
    files: int
    def __init__(self, manifest_key: _Optional[str] = ..., files: _Optional[int] = ...) -> None: ...

class ListRunFilesRequest(_message.Message):
    __slots__ = ("run_id", "include_checkpoints")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    include_checkpoints: bool
    def __init__(self, run_id: _Optional[str] = ..., include_checkpoints: _Optional[bool] = ...) -> None: ...

class ListRunFilesResponse(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[RunFile]
    def __init__(self, files: _Optional[_Iterable[_Union[RunFile, _Mapping]]] = ...) -> None: ...

class RunFile(_message.Message):
    __slots__ = ("key", "size", "sha256")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    key: str
    size: int
    sha256: str
    def __init__(self, key: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class DownloadFileRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class DownloadFileResponse(_message.Message):
    __slots__ = ("file", "chunk")
    FILE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    file: RunFile
    chunk: bytes
    def __init__(self, file: _Optional[_Union[RunFile, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...
