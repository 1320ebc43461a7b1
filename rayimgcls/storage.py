"""Local paths and URIs (s3://, gs://, any pyarrow filesystem) behind one small API.

Data roots, run directories, model directories and result directories may all live on object storage, so
every read and write of rayimgcls goes through here. S3 endpoint and credentials come from the standard
AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), which pyarrow reads itself.
"""

from __future__ import annotations

import functools
import os
import posixpath
from collections.abc import Iterable
from pathlib import Path

import pyarrow.fs as pafs


class PathEscapeError(ValueError):
    """An image path that resolves outside its data root."""


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


def resolve_under(root: str | os.PathLike, rel: str) -> str:
    """The location of `rel` inside `root`, refusing anything that lands outside it.

    Local roots compare real paths, so `../`, absolute paths and symlinks that point out are all caught;
    URIs have no symlinks, so a normalised key must stay below the root's prefix.
    """
    root = str(root)
    if not rel or not rel.strip():
        raise PathEscapeError("empty image path")
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


def read_bytes(path: str | os.PathLike) -> bytes:
    if not is_uri(path):
        return Path(path).read_bytes()
    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8-sig")  # Excel writes a BOM in front of CSV files


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file atomically where the filesystem allows it (local: temp file + rename)."""
    write_chunks(path, [data])


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


def exists(path: str | os.PathLike) -> bool:
    if not is_uri(path):
        return os.path.exists(path)
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def list_files(path: str | os.PathLike) -> list[str]:
    """Names (not paths) of the files directly inside a directory; [] when it does not exist."""
    if not is_uri(path):
        return sorted(p.name for p in Path(path).iterdir() if p.is_file()) if os.path.isdir(path) else []
    fs, inner = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)


def walk_files(path: str | os.PathLike) -> list[str]:
    """Paths (relative to `path`, '/'-separated, sorted) of every file below a directory; [] when none."""
    if not is_uri(path):
        root = Path(path)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    fs, inner = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True, recursive=True))
    return sorted(posixpath.relpath(i.path, inner) for i in infos if i.type == pafs.FileType.File)


def delete_file(path: str | os.PathLike) -> None:
    if not is_uri(path):
        Path(path).unlink(missing_ok=True)
        return
    fs, inner = filesystem(path)
    fs.delete_file(inner)


def rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename within one filesystem (on S3 a copy + delete, which is how shards become visible whole)."""
    if not is_uri(src):
        os.replace(src, dst)
        return
    fs, src_inner = filesystem(src)
    fs.move(src_inner, filesystem(dst)[1])


def makedirs(path: str | os.PathLike) -> None:
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)
        return
    fs, inner = filesystem(path)
    fs.create_dir(inner, recursive=True)
