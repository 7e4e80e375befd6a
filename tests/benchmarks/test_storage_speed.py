import argparse

import pytest

from pipeline.benchmarks import index_speed, storage_speed


def parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_index_benchmark_times_the_old_loop_and_both_new_paths_on_the_same_shards(s3_store):
    results = index_speed.run(parse(index_speed, [
        "--num-shards", "12", "--serial-shards", "3", "--samples-per-shard", "5", "--image-bytes", "300",
        "--rounds", "1", "--use-configured-endpoint", "--bucket", s3_store.bucket]))
    assert len(results["seconds"]) == 4 and all(v > 0 for v in results["seconds"].values())
    assert next(iter(results["speedup"].values())) == pytest.approx(1.0)  # (serial) is the reference


def test_storage_benchmark_reads_the_same_shards_from_disk_and_from_the_endpoint(ray_local, s3_store, tmp_path):
    results = storage_speed.run(parse(storage_speed, [
        "--modes", "data", "--num-images", "24", "--shard-size", "8", "--batch-size", "8", "--rounds", "2",
        "--use-configured-endpoint", "--bucket", s3_store.bucket, "--workdir", str(tmp_path)]))
    data = results["data"]
    assert data["local"] > 0 and data["s3"] > 0 and 0.0 < data["ratio"] < 10.0
    assert sorted(p.name for p in (tmp_path / "shards").iterdir())[-1] == "bench.manifest.json"
