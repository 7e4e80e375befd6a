import argparse
import contextlib
import http.server
import json
import math
import statistics
import threading
from pathlib import Path

import pytest

from pipeline.benchmarks import train_speed

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_speed.add_arguments(parser)
    return parser.parse_args(argv)


def test_train_benchmark_measures_all_three_modes(ray_local, capsys):
    # the memory mode uses ViT-Ti/16's weights at 32 px (4 patches): its qkv and MLP matrices are above ZeRO-3's
    # persistence threshold (1e5 elements), as in a real run, while the demo model's are all below it
    args = parse(["--modes", "overhead,memory,gpu", "--device", "cpu", "--cores", "2",
                  "--preset", "vit_demo_patch4_32", "--img-size", "32", "--batch-size", "8", "--num-classes", "10",
                  "--warmup", "1", "--steps", "2", "--rounds", "2",
                  "--memory-preset", "vit_tiny_patch16_224", "--memory-img-size", "32", "--memory-precisions", "bf16",
                  "--gpu-preset", "vit_demo_patch4_32", "--gpu-img-size", "32", "--gpu-batch-size", "8",
                  "--gpu-warmup", "1", "--gpu-steps", "2", "--peak-tflops", "1", "--gpu-zero-stage", "1",
                  "--gpu-compile"])
    results = train_speed.run(args)

    overhead = results["overhead"]
    assert set(overhead["median_step_s"]) == {"plain torch", "Ray Train + DeepSpeed ZeRO-0",
                                              "Ray Train + DeepSpeed ZeRO-2"}
    assert all(0 < seconds < 30 for seconds in overhead["median_step_s"].values())
    for ratios in (overhead["ratio"], overhead["round_ratio"], overhead["fastest_ratio"]):
        assert len(ratios) == 2 and all(math.isfinite(r) and r > 0 for r in ratios.values())
    # the same initial weights, batch and optimizer: the first loss is identical on every side
    first_losses = [details["losses"][0] for details in overhead["details"].values()]
    assert max(first_losses) - min(first_losses) < 1e-4
    assert {details["threads"] for details in overhead["details"].values()} == {2}

    memory = results["memory"]
    for precision in ("bf16",):  # the GPU precision, and the only DeepSpeed bf16 engines built in the suite
        state = {stage: memory[f"{precision} ZeRO-{stage}"]["state"] for stage in range(4)}
        assert all(state[stage] < state[0] for stage in (1, 2, 3)), state
        assert state[3] == min(state.values()), state
        assert state[0] >= 16 * memory[f"{precision} ZeRO-0"]["num_params"]  # params + grads + two moments
        # ZeRO-3's reduce bucket is capped at the model's size instead of DeepSpeed's 5e8 elements
        assert memory[f"{precision} ZeRO-3"]["buckets"] <= 4 * memory[f"{precision} ZeRO-3"]["num_params"]

    gpu = results["gpu"]
    assert gpu["images_per_s"] > 0 and gpu["forward_flops"] > 0
    assert gpu["achieved_flops"] == pytest.approx(3 * gpu["forward_flops"] * gpu["images_per_s"])
    assert gpu["mfu"] == pytest.approx(3 * gpu["forward_flops"] * gpu["images_per_s"] / 1e12)
    # compiled (train.compile=true) at ZeRO-1: the first step holds the compile, and from the same initial weights
    # and batch it computes the eager contenders' first loss
    assert (gpu["zero_stage"], gpu["compile"], gpu["dtype"]) == (1, True, "float32")
    assert gpu["first_step_s"] == gpu["warmup_s"] > 3 * gpu["median_step_s"]
    assert gpu["warmup_losses"][0] == pytest.approx(statistics.mean(first_losses), abs=1e-4)

    out = capsys.readouterr().out
    assert "### Orchestration overhead" in out and "### Per-rank state bytes" in out and "### GPU" in out



@contextlib.contextmanager
def other_clusters_state_api():
    """Another cluster's Ray state API on 127.0.0.1, which has never heard of this cluster's actors: it finds no
    actor by any id. Yields its URL and the paths it was asked for."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            body = json.dumps({"result": True, "msg": "", "data": {"result": {
                "result": [], "total": 0, "num_after_truncation": 0, "num_filtered": 0,
                "partial_failure_warning": "", "warnings": None}}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, name="other-state-api", daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", asked
    finally:
        server.shutdown()
        server.server_close()


def test_ray_state_api_address_comes_from_the_environment_first(monkeypatch):
    # what launch.own_dashboard relies on: Ray Train's PlacementGroupCleaner asks ray.util.state.get_actor with no
    # address (ray/train/v2/_internal/state/util.py, is_actor_alive), and that reads RAY_API_SERVER_ADDRESS before
    # RAY_ADDRESS or any cluster on the host (ray/dashboard/utils.py, get_address_for_submission_client)
    from ray.util.state import get_actor

    with other_clusters_state_api() as (other_cluster, asked):
        monkeypatch.setenv("RAY_API_SERVER_ADDRESS", other_cluster)
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # no Ray there
        assert get_actor("ab" * 16, timeout=5) is None
    assert len(asked) == 1 and asked[0].startswith("/api/v0/actors?") and "ab" * 16 in asked[0], asked
