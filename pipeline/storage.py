"""Where files live: a local path or any pyarrow filesystem URI (`s3://`, `gs://`, `hdfs://`, `file://`, ...).

A location is a string, and it stays a URI (scheme included) wherever it is stored, printed, tagged or handed
to another process: the driver, Train workers and decode tasks each resolve the filesystem from it where they
use it. pyarrow's own paths (`bucket/key`, no scheme) never leave the function that resolved them, because
another process would read such a path as a local relative one.

Credentials, endpoint and region come from what pyarrow reads: for S3 the standard `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL` (an S3-compatible store) or an
instance profile; for GCS `GOOGLE_APPLICATION_CREDENTIALS`; options in the URI's query
(`s3://bucket/x?endpoint_override=…`) are kept with it.
"""

from __future__ import annotations

import functools
import os
import posixpath
import shutil
import tempfile
import urllib.parse

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    """True for a URI with a scheme other than `file://` (a plain path is local)."""
    scheme = urllib.parse.urlparse(str(uri)).scheme
    return "://" in str(uri) and scheme not in ("", "file")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, its path) of a location; local paths come back absolute."""
    uri = str(uri)
    if not is_remote(uri):
        path = urllib.parse.urlparse(uri).path if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    return pafs.FileSystem.from_uri(uri)


def resolve_many(uris: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """One filesystem for locations that share it, and each one's path: the filesystem is resolved once (an S3
    client costs tens of milliseconds to make), the other paths follow from their URIs."""
    if not uris:
        raise ValueError("no locations given")
    fs, first = resolve(uris[0])
    if not is_remote(uris[0]):
        return fs, [first, *(_local_path(uri) for uri in uris[1:])]
    uri_prefix, fs_prefix = _prefixes(uris[0], first)
    paths = [first]
    for uri in uris[1:]:
        if not uri.split("?", 1)[0].startswith(uri_prefix) or _query(uri) != _query(uris[0]):
            raise ValueError(f"{uri} is not on the filesystem of {uris[0]}: give locations of one store")
        paths.append(fs_prefix + uri.split("?", 1)[0][len(uri_prefix):])
    return fs, paths


def to_uri(base: str, path: str) -> str:
    """The location of pyarrow path `path` (a sibling or child of `base`, an entry of a listing) on the
    filesystem of location `base`, written the way `base` is: a plain path for local files; scheme, host and
    query for a URI."""
    if not is_remote(base):
        return path
    uri_prefix, fs_prefix = _prefixes_of(base)
    if not path.startswith(fs_prefix):
        raise ValueError(f"{path} is not on the filesystem of {base}")
    query = _query(base)
    return uri_prefix + path[len(fs_prefix):] + (f"?{query}" if query else "")


def join(base: str, *names: str) -> str:
    """`base/names…` for a folder location, local or URI (the URI's query stays at the end)."""
    if not is_remote(base):
        return os.path.join(base, *names)
    parsed = urllib.parse.urlparse(base)
    return urllib.parse.urlunparse(parsed._replace(path=posixpath.join(parsed.path or "/", *names)))


def parent(uri: str) -> str:
    if not is_remote(uri):
        return os.path.dirname(os.path.abspath(uri))
    parsed = urllib.parse.urlparse(uri)
    return urllib.parse.urlunparse(parsed._replace(path=posixpath.dirname(parsed.path.rstrip("/"))))


def basename(uri: str) -> str:
    return posixpath.basename(urllib.parse.urlparse(uri).path.rstrip("/") if is_remote(uri) else uri.rstrip("/"))


def file_type(uri: str) -> pafs.FileType:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type


def exists(uri: str) -> bool:
    return file_type(uri) != pafs.FileType.NotFound


def download(uri: str, names: tuple[str, ...] | None = None, *, prefix: str = "download-") -> str:
    """A local folder holding the folder `uri` (all of it, or only `names` that exist in it), or the file `uri`
    itself; local locations are returned as they are. The folder is the caller's to delete."""
    if not is_remote(uri):
        return resolve(uri)[1]
    fs, path = resolve(uri)
    target = tempfile.mkdtemp(prefix=prefix)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            local = os.path.join(target, posixpath.basename(path))
            pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            return local
        if info.type != pafs.FileType.Directory:
            raise FileNotFoundError(f"{uri} does not exist")
        if names is None:
            pafs.copy_files(path, target, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                            use_threads=True)
        else:
            infos = fs.get_file_info([posixpath.join(path, name) for name in names])
            for name, found in zip(names, infos, strict=True):
                if found.type == pafs.FileType.File:
                    pafs.copy_files(found.path, os.path.join(target, name), source_filesystem=fs,
                                    destination_filesystem=pafs.LocalFileSystem())
        return target
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def _local_path(uri: str) -> str:
    if is_remote(uri):
        raise ValueError(f"{uri} is remote, the other locations are local: give locations of one store")
    return resolve(uri)[1]


def _query(uri: str) -> str:
    return urllib.parse.urlparse(uri).query


@functools.lru_cache(maxsize=64)
def _prefixes_of(base: str) -> tuple[str, str]:
    """`_prefixes` of a location, asking pyarrow (a new client) only for stores other than buckets, and once per
    location: a listing maps every entry back through the same one."""
    return _prefixes(base, None if _bucket_in_path(base) else resolve(base)[1])


def _prefixes(uri: str, path: str | None) -> tuple[str, str]:
    """(URI prefix, pyarrow path prefix) that a location and its pyarrow path `path` share with every location
    of the same store: `s3://bucket/` and `bucket/`; `hdfs://host:8020/` and `/`."""
    parsed = urllib.parse.urlparse(uri)
    tail = parsed.path.lstrip("/")
    if path is None:  # a bucket store: the pyarrow path is the bucket and the key
        path = f"{parsed.netloc}/{tail}"
    fs_prefix = path[: len(path) - len(tail)] if tail and path.endswith(tail) else path.rstrip("/") + "/"
    return f"{parsed.scheme}://{parsed.netloc}/", fs_prefix


# Stores whose pyarrow paths are the bucket and the key (`s3://bucket/key` -> `bucket/key`), known without
# asking pyarrow; the others (hdfs://host:port/path -> /path, abfs://container@account/path -> container/path)
# are resolved once per store.
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


def _bucket_in_path(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in _BUCKET_SCHEMES
