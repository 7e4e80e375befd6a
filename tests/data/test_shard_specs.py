"""Shard specs to locations, on local disk and on a real S3-compatible server (moto, `s3_store`): lists, globs,
brace patterns, folders; the scheme kept; missing shards named."""

import os

import pyarrow.fs as pafs
import pytest

from pipeline import storage
from pipeline.data.shard_specs import expand_shards, list_shards


@pytest.fixture
def shards(tars):
    """Five shards of two samples each: shard i holds keys i0, i1 with label i."""
    return [tars.write(f"s/train-{i:06d}.tar", [tars.good_record(f"{i}{j}", label=i, seed=j) for j in range(2)])
            for i in range(5)]


def upload(folder, uri: str) -> None:
    fs, path = storage.resolve(uri)
    pafs.copy_files(str(folder), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def test_local_lists_globs_braces_folders_and_file_uris(shards, tmp_path):
    folder = str(tmp_path / "s")
    (tmp_path / "s" / "notes.txt").write_text("not a shard")
    expected = [os.path.abspath(p) for p in shards]
    assert expand_shards(shards) == expected
    assert expand_shards(f"{folder}/train-*.tar") == expected
    assert expand_shards(f"{folder}/train-{{000000..000004}}.tar") == expected
    assert expand_shards(folder) == expected
    assert expand_shards(f"file://{folder}/train-{{000000..000001}}.tar") == expected[:2]
    assert [s.num_bytes for s in list_shards(folder)] == [os.path.getsize(p) for p in expected]
    with pytest.raises(FileNotFoundError, match="no files match .*val-"):
        expand_shards(f"{folder}/val-*.tar")
    with pytest.raises(FileNotFoundError, match=r"5 of 10 shards do not exist: .*train-000005.tar, .*, …"):
        expand_shards(f"{folder}/train-{{000000..000009}}.tar")  # more than a few: found through one listing
    with pytest.raises(FileNotFoundError, match=r"shard .*train-000007.tar does not exist"):
        expand_shards([shards[0], f"{folder}/train-000007.tar"])  # a few: looked up one by one
    with pytest.raises(ValueError, match="wildcards may only appear in the file name"):
        expand_shards(f"{tmp_path}/*/train-000000.tar")


def test_s3_locations_keep_their_scheme(shards, tmp_path, s3_store):
    prefix = s3_store.uri("specs", tmp_path.name)
    upload(tmp_path / "s", prefix)
    expected = [f"{prefix}/train-{i:06d}.tar" for i in range(5)]
    assert expand_shards(f"{prefix}/train-*.tar") == expected
    assert expand_shards(f"{prefix}/train-{{000000..000004}}.tar") == expected
    assert expand_shards(prefix) == expected
    assert expand_shards(expected[3]) == expected[3:4]
    assert [s.num_bytes for s in list_shards(prefix)] == [os.path.getsize(p) for p in shards]
    with pytest.raises(FileNotFoundError, match=rf"shard {prefix}/train-000005.tar does not exist"):
        expand_shards(f"{prefix}/train-{{000000..000005}}.tar")
    with pytest.raises(FileNotFoundError, match=rf"no files match {prefix}/val-\*.tar"):
        expand_shards(f"{prefix}/val-*.tar")
    with pytest.raises(ValueError, match="not on the filesystem of"):
        expand_shards([expected[0], shards[1]])


def test_storage_maps_pyarrow_paths_back_to_uris(s3_store, tmp_path):
    uri = s3_store.uri("runs", "r1", "checkpoint_000001")
    fs, path = storage.resolve(uri)
    assert path == f"{s3_store.bucket}/runs/r1/checkpoint_000001"
    assert storage.to_uri(s3_store.uri("runs"), path) == uri
    assert storage.join(s3_store.uri("runs"), "r1", "x.json") == s3_store.uri("runs", "r1", "x.json")
    assert storage.parent(uri) == s3_store.uri("runs", "r1") and storage.basename(uri) == "checkpoint_000001"
    with_query = "s3://bucket/a/b.tar?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.basename(with_query) == "b.tar"
    assert storage.to_uri(with_query, "bucket/a/c.tar") == "s3://bucket/a/c.tar?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.to_uri(str(tmp_path), str(tmp_path / "x")) == str(tmp_path / "x")
    assert not storage.is_remote(str(tmp_path)) and not storage.is_remote(f"file://{tmp_path}")
