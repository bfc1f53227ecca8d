"""Paths that are local folders or ``s3://`` URIs, through pyarrow's filesystems (S3 honours AWS_ENDPOINT_URL
and the usual AWS variables), with atomic writes and one-line errors for sources that cannot be read.

Writes to S3 go through boto3's single ``put_object``: an S3 object becomes visible whole or not at all, so
no temporary key is needed (pyarrow's multipart upload is also refused by some S3-compatible servers)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from cli_module.files import atomic_write

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


class SourceError(RuntimeError):
    """A source or destination that cannot be used at all: reported in one line before any work starts."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """'s3://bucket/key' or a local path -> (filesystem, path inside it)."""
    if uri.startswith("s3://"):
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts]) if uri.startswith("s3://") else os.path.join(uri, *parts)


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def _describe(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return f"the bucket does not exist ({text})"
    if "AccessDenied" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text or "403" in text:
        return f"access denied: check AWS credentials and AWS_ENDPOINT_URL ({text})"
    return text


def list_files(uri: str) -> list[str]:
    """Every non-hidden file under a folder or prefix, sorted; SourceError if missing, empty or unreadable."""
    fs, path = resolve(uri)
    try:
        if uri.startswith("s3://"):
            check_bucket(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [to_uri(fs, path)]
        if info.type == pafs.FileType.NotFound and not isinstance(fs, pafs.S3FileSystem):
            raise SourceError(f"{uri}: no such file or folder")
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except SourceError:
        raise
    except Exception as err:  # pyarrow raises OSError subclasses with the S3 error text
        raise SourceError(f"{uri}: cannot list: {_describe(err)}") from err
    files = sorted(to_uri(fs, i.path) for i in infos if i.type == pafs.FileType.File
                   and not any(part.startswith((".", "_")) for part in i.path[len(path):].split("/")))
    if not files:
        raise SourceError(f"{uri}: no files found; point at a folder or prefix of images, or a manifest")
    return files


def _s3_put(uri: str, data: bytes) -> None:
    import boto3

    bucket, _, key = uri[len("s3://"):].partition("/")
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)


def check_bucket(uri: str) -> None:
    """head_bucket, so a missing bucket or bad credentials say so instead of looking like an empty prefix."""
    import boto3
    from botocore.exceptions import ClientError

    bucket = uri[len("s3://"):].split("/", 1)[0]
    try:
        boto3.client("s3").head_bucket(Bucket=bucket)
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise SourceError(f"{uri}: the bucket {bucket!r} does not exist") from err
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise SourceError(f"{uri}: access denied ({code}): check AWS credentials and AWS_ENDPOINT_URL") from err
        raise SourceError(f"{uri}: cannot reach the bucket: {err}") from err


def check_writable(uri: str) -> None:
    """Create the destination (or check its bucket) so a bad DEST fails before any work."""
    fs, path = resolve(uri)
    try:
        probe = f"{path}/.write-probe-{uuid.uuid4().hex}"
        if uri.startswith("s3://"):
            check_bucket(uri)
            _s3_put(f"s3://{probe}", b"ok")
        else:
            fs.create_dir(path, recursive=True)
            with fs.open_output_stream(probe) as f:
                f.write(b"ok")
        fs.delete_file(probe)
    except Exception as err:
        raise SourceError(f"{uri}: cannot write: {_describe(err)}") from err


def image_key(uri: str) -> str:
    """The key a feature cache joins an image by: s3:// URIs as they are; local paths absolute with symlinks
    resolved, so a data folder reached through a link matches the cache built from the folder itself."""
    return uri if uri.startswith("s3://") else os.path.realpath(uri)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def write_atomic(uri: str, data: bytes) -> None:
    """Write under a hidden temporary name beside the target, then rename: readers never see half a file."""
    if uri.startswith("s3://"):
        return _s3_put(uri, data)
    atomic_write(resolve(uri)[1], data)  # its temporary name starts with .tmp- too (remove_temporaries)


def write_json(uri: str, obj: object) -> None:
    write_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(uri: str) -> dict:
    return json.loads(read_bytes(uri))


def remove_temporaries(uri: str) -> int:
    """Delete '.tmp-*' files a killed run left in a folder; returns how many."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    stale = [i.path for i in infos if i.type == pafs.FileType.File and Path(i.path).name.startswith(".tmp-")]
    for p in stale:
        fs.delete_file(p)
    return len(stale)
