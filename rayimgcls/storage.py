"""Local paths and URIs (s3://, gs://, any pyarrow filesystem) behind one small API.

Data roots, run directories, model directories and result directories may all live on object storage, so
every read and write of rayimgcls goes through here. S3 endpoint and credentials come from the standard
AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), which pyarrow reads itself.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")


class PathEscapeError(ValueError):
    """An image path that cannot be used: it resolves outside its data root (`code` "path_escape"), or holds
    a control character, which no real file name has (`code` "bad_path")."""

    def __init__(self, message: str, code: str = "path_escape") -> None:
        super().__init__(message)
        self.code = code


class StorageError(OSError):
    """A path or URI the user gave that cannot be read or written: not found, a directory where a file should
    be, permission denied, no such bucket, access denied, an unreachable endpoint. The message names the path;
    `reason` is the short cause ("not found", ...) for per-row reports. Our own file handling outside this
    module raises the plain OSError subclasses, so a bug never passes for a user's mistake."""

    def __init__(self, path: str, reason: str, code: int | None = None) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.errno = path, reason, code

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    @property
    def missing(self) -> bool:
        return self.errno == errno.ENOENT


def _reason(e: Exception) -> tuple[str, int | None]:
    """A short cause for an OSError from the OS or from pyarrow (whose S3 errors carry AWS's error name)."""
    text = str(e)
    if isinstance(e, FileNotFoundError) or "Path does not exist" in text or "NoSuchKey" in text:
        return "not found", errno.ENOENT
    if isinstance(e, IsADirectoryError):
        return "is a directory, not a file", e.errno
    if isinstance(e, NotADirectoryError):
        return "a part of the path is a file, not a directory", e.errno
    if isinstance(e, PermissionError):
        return "permission denied", e.errno
    if "ACCESS_DENIED" in text or "AccessDenied" in text:  # pyarrow's and AWS's names for S3's 403
        return "access denied (these AWS credentials may not do this)", errno.EACCES
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[0].lower() + e.strerror[1:], e.errno
    return (text.strip() or type(e).__name__).splitlines()[0], getattr(e, "errno", None)


@contextlib.contextmanager
def _named(path: str | os.PathLike) -> Iterator[None]:
    """OSError (and pyarrow's ValueError for a malformed URI or a NUL in a path) -> StorageError naming `path`."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, ValueError) as e:
        if isinstance(e, PathEscapeError):
            raise
        reason, code = _reason(e)
        raise StorageError(str(path), reason, code) from None


def _user_path(fn: Callable[..., T]) -> Callable[..., T]:
    """Report any OSError of `fn(path, ...)` as a StorageError naming the path."""

    @functools.wraps(fn)
    def wrapper(path: str | os.PathLike, *args, **kwargs) -> T:
        with _named(path):
            return fn(path, *args, **kwargs)

    return wrapper


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or a URI."""
    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    if path.startswith("s3://"):
        return s3_filesystem(path), path[len("s3://") :].rstrip("/")
    fs, inner = pafs.FileSystem.from_uri(path)
    return fs, inner.rstrip("/")


def s3_filesystem(uri: str) -> pafs.S3FileSystem:
    """The S3 filesystem of an s3:// URI, configured from the standard AWS variables, one per process and
    setting (a new one per file would fetch credentials per image: instance metadata, or STS under IRSA).

    The endpoint comes from AWS_ENDPOINT_URL (MinIO, Ceph, moto): a plain `S3FileSystem()` ignores that variable.
    On AWS the region is the bucket's own (looked up once), AWS_DEFAULT_REGION / AWS_REGION only where that
    lookup fails: a client's region passed on to a job must not point workers at the wrong one.
    `allow_delayed_open` sends an object smaller than one upload part (every file rayimgcls writes except large
    weights) as one PUT when it is closed, instead of a three-request multipart upload opened before any byte is
    written; errors still surface, at close.
    """
    settings = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    bucket = "" if os.environ.get("AWS_ENDPOINT_URL") else uri[len("s3://") :].split("/", 1)[0]
    return _s3_filesystem(settings, bucket)


@functools.lru_cache(maxsize=64)
def _s3_filesystem(settings: tuple[tuple[str, str], ...], bucket: str) -> pafs.S3FileSystem:
    env = dict(settings)
    endpoint = env.get("AWS_ENDPOINT_URL")
    region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
    if endpoint:
        return pafs.S3FileSystem(
            endpoint_override=endpoint,
            scheme="https" if endpoint.startswith("https") else "http",
            region=region or "us-east-1",
            allow_delayed_open=True,
        )
    try:
        region = pafs.resolve_s3_region(bucket)
    except OSError:
        if not region:
            raise
    return pafs.S3FileSystem(region=region, allow_delayed_open=True)


def train_storage(path: str | os.PathLike) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig. Left to itself Ray resolves a URI with
    `FileSystem.from_uri`, which some pyarrow versions build without AWS_ENDPOINT_URL, and never with the options
    above; so a URI travels as our filesystem plus the path within it, and checkpoints go where every other file
    of the run goes. A local path stays as it is, for Ray to handle."""
    if not is_uri(path):
        return str(path), None
    fs, inner = filesystem(path)
    return inner, fs


def join(root: str | os.PathLike, *parts: str) -> str:
    """Join path parts under a local root or a URI."""
    root = str(root)
    return posixpath.join(root.rstrip("/"), *parts) if is_uri(root) else os.path.join(root, *parts)


def control_character(rel: str) -> str | None:
    """Why `rel` cannot be a file name we open: a NUL or another control character (a NUL is also where the
    OS would cut the name short). None for an ordinary name."""
    bad = next((c for c in rel if not c.isprintable() and c != " "), None)
    return None if bad is None else f"the path contains the control character {bad!r}"


def resolve_under(root: str | os.PathLike, rel: str) -> str:
    """The location of `rel` inside `root`, refusing anything that lands outside it.

    Local roots compare real paths, so `../`, absolute paths and symlinks that point out are all caught;
    URIs have no symlinks, so a normalised key must stay below the root's prefix.
    """
    root = str(root)
    if not rel or not rel.strip():
        raise PathEscapeError("empty image path")
    if (reason := control_character(rel)) is not None:
        raise PathEscapeError(reason, "bad_path")
    if is_uri(rel):
        raise PathEscapeError(f"image path {rel!r} is a URI; paths must be relative to the data root")
    if is_uri(root):
        base = root.rstrip("/")
        scheme, _, prefix = base.partition("://")
        key = posixpath.normpath(posixpath.join(prefix, rel))
        if rel.startswith("/") or not key.startswith(prefix + "/"):
            raise PathEscapeError(f"image path {rel!r} escapes the data root {root}")
        return f"{scheme}://{key}"
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise PathEscapeError(f"image path {rel!r} resolves to {real}, outside the data root {real_root}")
    return real


@_user_path
def read_bytes(path: str | os.PathLike) -> bytes:
    if not is_uri(path):
        return Path(path).read_bytes()
    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as f:
        return f.read()


@_user_path
def read_range(path: str | os.PathLike, offset: int, length: int) -> bytes:
    """`length` bytes from `offset` (fewer at the end of the file), without reading the rest."""
    if not is_uri(path):
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)
    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as f:
        return f.read_at(length, offset)


@_user_path
def open_input(path: str | os.PathLike) -> BinaryIO:
    """The file as a binary stream, for a reader that takes it in pieces instead of holding it whole."""
    if not is_uri(path):
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    fs, inner = filesystem(path)
    return fs.open_input_stream(inner)


def read_text(path: str | os.PathLike) -> str:
    """The file as UTF-8 text (a BOM, which Excel writes in front of CSV files, is dropped). Any other
    encoding is a TextEncodingError naming the file and the first line that is not UTF-8."""
    return decode_text(read_bytes(path), str(path))


class TextEncodingError(ValueError):
    """A text file that is not UTF-8 (a spreadsheet's cp1252 or UTF-16 export); names the line."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path, self.line, self.message = path, line, message


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 (BOM allowed) bytes -> str; TextEncodingError for UTF-16 and for bytes that are not UTF-8."""
    save_as = "save it as UTF-8 (in Excel: CSV UTF-8)"
    first_line = data[: data.find(b"\n")] if b"\n" in data else data
    if data.startswith(UTF16_BOMS) or b"\x00" in first_line[:200] and first_line.count(b"\x00") * 3 > len(first_line):
        raise TextEncodingError(name, 1, f"the file is UTF-16, not UTF-8: {save_as}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TextEncodingError(
            name, line, f"byte {data[e.start]:#04x} is not UTF-8 (a cp1252/Latin-1 export?): {save_as}"
        ) from None


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file atomically where the filesystem allows it (local: temp file + rename)."""
    write_chunks(path, [data])


@_user_path
def write_chunks(path: str | os.PathLike, chunks: Iterable[bytes]) -> None:
    """`write_bytes` for data streamed in pieces (a merged file larger than memory), equally atomic."""
    if not is_uri(path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with tmp.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
        return
    fs, inner = filesystem(path)
    with fs.open_output_stream(inner) as f:  # an object store PUT is atomic already
        for chunk in chunks:
            f.write(chunk)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@_user_path
def exists(path: str | os.PathLike) -> bool:
    if not is_uri(path):
        return os.path.exists(path)
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


@_user_path
def list_files(path: str | os.PathLike) -> list[str]:
    """Names (not paths) of the files directly inside a directory; [] when it does not exist."""
    if not is_uri(path):
        return sorted(p.name for p in Path(path).iterdir() if p.is_file()) if os.path.isdir(path) else []
    fs, inner = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)


@_user_path
def walk_files(path: str | os.PathLike) -> list[str]:
    """Paths (relative to `path`, '/'-separated, sorted) of every file below a directory; [] when none."""
    if not is_uri(path):
        root = Path(path)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    fs, inner = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True, recursive=True))
    return sorted(posixpath.relpath(i.path, inner) for i in infos if i.type == pafs.FileType.File)


@_user_path
def delete_file(path: str | os.PathLike) -> None:
    if not is_uri(path):
        Path(path).unlink(missing_ok=True)
        return
    fs, inner = filesystem(path)
    fs.delete_file(inner)


@_user_path
def rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename within one filesystem (on S3 a copy + delete, which is how shards become visible whole)."""
    if not is_uri(src):
        os.replace(src, dst)
        return
    fs, src_inner = filesystem(src)
    fs.move(src_inner, filesystem(dst)[1])


@_user_path
def makedirs(path: str | os.PathLike) -> None:
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)
        return
    fs, inner = filesystem(path)
    fs.create_dir(inner, recursive=True)
