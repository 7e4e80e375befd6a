"""The console's quiet list (pipeline/console.py): the known library lines are dropped, genuine warnings and errors
of the same libraries still reach the console, and verbose (train.verbose, VIT_PIPELINE_VERBOSE) brings every
quieted line back. The ratio on a real demo pretrain is checked where the demo chain runs it
(tests/e2e/test_finetune.py)."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import console
from pipeline.internals import skip_forwarded_lines

# one line of each kind that FORWARDED_QUIET drops, as the driver receives them from Ray's workers and actors
QUIETED = [
    "✔️  Dataset dataset_035767UQg3KwPDTNK3IUPm_7 execution finished in 1.87 seconds",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "Reporting training result 2: TrainingReport(checkpoint=Checkpoint(filesystem=local, path=/r/checkpoint_1), "
    "metrics={'step': 400, 'epoch': 18}) from rank 1",
    "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/r/checkpoint_1)",
    "[2026-12-01 11:02:55,459 E 30750 30829] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and "
    "ID: 'bd0961c08741eb3baa23ad7301000000' has constructor arguments in the object store and max_restarts > 0.",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    "Attempting to start training worker group of size 2 with the following resources: [{'CPU': 0.5}] * 2",
    "Setting up process group for: env:// [rank=0, world_size=2]",
]
# what the same sources say when something is wrong: never dropped
GENUINE = [
    "⚠️  Dataset dataset_035767UQg3KwPDTNK3IUPm_7 execution failed",
    "[2026-12-01 11:02:55,459 E 30750 30829] core_worker.cc:901: Actor with class name: 'RayTrainWorker' died "
    "unexpectedly",
    "Synchronization barrier was reset (likely due to a worker failure). Skipping this report.",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op failed to build",
    "Requesting resources: {'CPU': 0.5} * 2",
    "Started training worker group of size 2: ",
    "[pipeline] step 25/600 | loss 2.271 | lr 6.25e-04 | 129 img/s | data wait 56% | eta 4m45s",
]


@pytest.fixture
def forwarded():
    """What the driver prints of a batch of forwarded lines, through Ray's own filter (each call from a new pid,
    so that Ray's deduplication across processes holds nothing back); Ray's filter is reset afterwards."""
    from ray._private.ray_logging import stdout_deduplicator

    pids = iter(range(900_000, 901_000))

    def printed(lines: list[str]) -> list[str]:
        batch = {"ip": "192.0.2.2", "pid": next(pids), "task_name": None, "actor_name": "SplitCoordinator",
                 "is_err": False, "lines": list(lines)}
        return [line for out in stdout_deduplicator.deduplicate(batch) for line in out["lines"]]

    yield printed
    skip_forwarded_lines(None)
    stdout_deduplicator.flush()


def test_the_driver_drops_the_known_forwarded_lines_and_verbose_brings_them_back(forwarded, monkeypatch):
    monkeypatch.delenv("RAY_DEDUP_LOGS_SKIP_REGEX", raising=False)
    console.quiet_driver(False)
    assert forwarded(QUIETED + GENUINE) == GENUINE
    console.quiet_driver(True)
    assert forwarded(QUIETED) == QUIETED
    assert logging.getLogger("mlflow.store.db.utils").level == logging.NOTSET

    # a skip pattern of the user's own stays, in both modes (the lines differ in words: Ray's deduplication
    # holds back a line that another process printed moments before, numbers aside)
    monkeypatch.setenv("RAY_DEDUP_LOGS_SKIP_REGEX", "^my noise")
    console.quiet_driver(False)
    assert forwarded(["my noise", *QUIETED, "kept"]) == ["kept"]
    assert logging.getLogger("mlflow.store.db.utils").level == logging.WARNING
    console.quiet_driver(True)
    again = "✔️  Dataset another_one execution finished in 1.00 seconds"
    assert forwarded(["my noise again", again, "kept again"]) == [again, "kept again"]


WORKER = """
import logging, sys, warnings
from pipeline import console
from pipeline.internals import skip_forwarded_lines
console.driver_console()  # a stderr handler on the root logger, as in a job
console.worker_console(sys.argv[1] == "verbose")
console.ray_data_console(sys.argv[1] == "verbose")
import ray.data
context = ray.data.DataContext.get_current()
print("print_on_execution_start", context.print_on_execution_start, "progress_bars", context.enable_progress_bars)
torch_log = logging.getLogger("torch.utils.cpp_extension")
torch_log.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
torch_log.warning("Error checking compiler version for c++: genuine")
warnings.warn("`torch.distributed._all_gather_base` is deprecated", FutureWarning)
warnings.warn("a genuine FutureWarning", FutureWarning)
logging.getLogger("ray.data").warning("a genuine Ray Data warning")
logging.getLogger("mlflow.store.db.utils").warning("a genuine MLflow warning")
logging.getLogger("pipeline.train.loop").info("step 1/2 | loss 2.3")
"""


@pytest.mark.parametrize("mode", ["default", "verbose"])
def test_genuine_library_warnings_reach_the_console_and_verbose_brings_the_quieted_back(mode, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    monkeypatch.setenv(console.TAG_ENV, "1")
    done = subprocess.run([sys.executable, "-c", WORKER, mode], capture_output=True, text=True, timeout=120,
                          check=True)
    out = done.stdout + done.stderr
    for genuine in ("Error checking compiler version for c++: genuine", "a genuine FutureWarning",
                    "a genuine Ray Data warning", "a genuine MLflow warning", "[pipeline] step 1/2 | loss 2.3"):
        assert genuine in out, (genuine, out)
    verbose = mode == "verbose"
    assert ("No CUDA runtime is found" in out) == verbose, out
    assert ("`torch.distributed._all_gather_base` is deprecated" in out) == verbose, out
    assert f"print_on_execution_start {verbose} progress_bars False" in out, out


def test_the_verbose_switches(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert not console.is_verbose() and console.is_verbose(True)
    for value, verbose in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv(console.VERBOSE_ENV, value)
        assert console.is_verbose(False) is verbose

    from pipeline.config import load_job_config

    config = Path(__file__).parents[1] / "jobs" / "configs" / "digits_pretrain.yaml"
    assert load_job_config(config, []).train.verbose is False
    assert load_job_config(config, ["train.verbose=true"]).train.verbose is True


def test_the_tag_and_the_counter(monkeypatch):
    formatter = console.ConsoleFormatter()
    record = logging.LogRecord("pipeline.train.loop", logging.INFO, __file__, 1, "two\nlines", None, None)
    other = logging.LogRecord("ray.data", logging.WARNING, __file__, 1, "theirs", None, None)
    monkeypatch.delenv(console.TAG_ENV, raising=False)
    assert formatter.format(record) == "two\nlines"
    monkeypatch.setenv(console.TAG_ENV, "1")
    assert formatter.format(record) == "[pipeline] two\n[pipeline] lines"
    assert formatter.format(other) == "theirs"

    text = "\n".join([
        "\x1b[36m(RayTrainWorker pid=30939)\x1b[0m [pipeline] step 25/600 | loss 2.271",
        "[pipeline] MLflow run c253 in sqlite:////tmp/mlflow.db; checkpoints under /tmp/runs/pretrain-1",
        "",
        "MLflow run:      c253  (experiment 'vit-pipeline')",
        "final val top-1: 0.9499 after 600 steps in 2.7 min",
        "checkpoint:      /tmp/runs/pretrain-1/checkpoint_1",
        "\rtrain shards:   0%|          | 0/1438\rtrain shards: 100%|██████████| 1438/1438",
        "\x1b[36m(TrainController pid=30750)\x1b[0m Started training worker group of size 2: ",
        "2026-12-01 11:02:44,191\tINFO worker.py:2029 -- Started a local Ray instance.",
        "\x1b[36m(SplitCoordinator pid=31913)\x1b[0m Execution plan of Dataset d_1: [pipeline] further on",
    ]) + "\n"
    total, foreign = console.count_lines(text)
    assert total == 10 and len(foreign) == 3 and foreign[0].endswith("size 2: ")
