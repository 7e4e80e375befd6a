import argparse
import os

import pytest

from pipeline.benchmarks import data_speed


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    data_speed.add_arguments(parser)
    return parser.parse_args(argv)


def test_data_benchmark_times_all_five_contenders_on_the_same_images(ray_local, tmp_path):
    args = parse(["--num-images", "24", "--shard-size", "8", "--img-size", "32", "--batch-size", "8",
                  "--cores", "2", "--rounds", "2", "--skip-rss", "--workdir", str(tmp_path)])
    results = data_speed.run(args)

    images_per_s = results["images_per_s"]
    assert len(images_per_s) == 5 and all(v > 0 for v in images_per_s.values()), images_per_s
    a, _, b, c, _ = images_per_s.values()
    assert results["a_over_b"][0] == pytest.approx(a / b) and results["a_over_c"][0] == pytest.approx(a / c)
    assert "peak_mib" not in results
    # 24 ImageNet-like JPEGs of 500x375 or 375x500 in 3 shards, with the manifest beside them
    shards = sorted((tmp_path / "shards").glob("bench-*.tar"))
    assert len(shards) == 3 and (tmp_path / "shards" / "bench.manifest.json").exists()

    # (b)'s DataLoader workers are spawned, not forked from this Ray driver: after forks, new actors here hung
    # and the raylet crashed on a malformed lease request
    ray = ray_local
    probe = ray.remote(num_cpus=0)(Probe).remote()
    assert ray.get(probe.pid.remote(), timeout=60) not in (0, os.getpid())


class Probe:
    def pid(self) -> int:
        return os.getpid()
