"""MetricLogger against a sqlite store and a real server: values and steps, batching, non-finite values, an outage."""

from __future__ import annotations

import logging
import math
import re
import signal
import socket
import time
import uuid

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking.metrics import MetricLogger
from pipeline.tracking.runs import start_job_run

LOGGER_NAME = "pipeline.tracking.metrics"


def _run(uri: str) -> str:
    return start_job_run(uri=uri, experiment=f"metrics-{uuid.uuid4().hex[:8]}", run_name="r", job="pretrain", config={})


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME and r.levelno == logging.WARNING]


def _loss(step: int) -> float:
    return 2.5 / (1 + 0.01 * step)


def test_metrics_arrive_with_their_steps_and_values(any_store):
    run_id = _run(any_store)
    logger = MetricLogger(any_store, run_id, flush_every_s=0.2)
    for step in range(0, 50, 5):
        logger.log({"train/loss": _loss(step), "train/lr": np.float32(0.5), "data/bad_samples": step // 10}, step)
    deadline = time.monotonic() + 10
    while len(_history(any_store, run_id, "train/loss")) < 10 and time.monotonic() < deadline:
        time.sleep(0.2)  # no flush: the sender ships on its own within flush_every_s
    assert _history(any_store, run_id, "train/loss") == [(step, _loss(step)) for step in range(0, 50, 5)]
    assert logger.close(timeout_s=10) is True
    assert _history(any_store, run_id, "train/lr") == [(step, 0.5) for step in range(0, 50, 5)]
    assert _history(any_store, run_id, "data/bad_samples") == [(step, float(step // 10)) for step in range(0, 50, 5)]
    assert logger.sent == 30 and logger.pending == 0 and logger.dropped == 0
    logger.log({"train/loss": 0.1}, 99)  # after close: dropped with a warning, never raised
    assert _history(any_store, run_id, "train/loss")[-1][0] == 45


def test_more_metrics_than_one_request_holds(server):
    run_id = _run(server.uri)
    keys = ("train/loss", "train/lr", "train/images_per_s", "train/step_time_s", "train/data_wait_s")
    with MetricLogger(server.uri, run_id, flush_every_s=60.0) as logger:  # only size triggers a send
        for step in range(500):
            logger.log({key: step + i / 10 for i, key in enumerate(keys)}, step)
        assert logger.flush(timeout_s=30)
        assert logger.sent == 2500  # 3 requests of at most 1,000 metrics
    for i, key in enumerate(keys):
        assert _history(server.uri, run_id, key) == [(step, step + i / 10) for step in range(500)]


def test_non_finite_values_are_logged_and_non_numbers_skipped(any_store, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    run_id = _run(any_store)
    logger = MetricLogger(any_store, run_id)
    values = [1.0, float("nan"), float("inf"), float("-inf"), 0.5]
    for step, value in enumerate(values):
        logger.log({"train/loss": value, "val/top1": "n/a" if step % 2 else 0.25}, step)
    assert logger.close(timeout_s=10)
    loss = _history(any_store, run_id, "train/loss")
    assert [step for step, _ in loss] == [0, 1, 2, 3, 4]
    assert loss[0][1] == 1.0 and math.isnan(loss[1][1]) and loss[4][1] == 0.5
    assert loss[2][1] == pytest.approx(1.7976931348623157e308) and loss[3][1] == pytest.approx(-1.7976931348623157e308)
    assert _history(any_store, run_id, "val/top1") == [(0, 0.25), (2, 0.25), (4, 0.25)]
    warnings = _warnings(caplog)
    assert len(warnings) == 2  # one per metric name, not one per step
    assert any("'train/loss'" in w and "logged as is" in w for w in warnings)
    assert any("'val/top1'" in w and "non-numeric" in w for w in warnings)


def test_invalid_metric_names_are_dropped_and_the_rest_logged(any_store, caplog):
    run_id = _run(any_store)
    logger = MetricLogger(any_store, run_id)
    for step in range(6):
        logger.log({"train/loss": _loss(step), "train/../loss": 1.0, "val/top5": 0.9}, step)
    assert logger.close(timeout_s=20)
    assert _history(any_store, run_id, "train/loss") == [(step, _loss(step)) for step in range(6)]
    assert _history(any_store, run_id, "val/top5") == [(step, 0.9) for step in range(6)]
    rejected = [w for w in _warnings(caplog) if "rejected" in w]
    assert len(rejected) == 1 and "'train/../loss'" in rejected[0]


def test_outage_loses_nothing_and_duplicates_nothing(server, caplog):
    """Stop the server by PID mid-run, keep logging, restart it on the same port and DB, flush: all steps once."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    run_id = _run(server.uri)
    logger = MetricLogger(server.uri, run_id, flush_every_s=0.2, retry_every_s=1.0, request_timeout_s=2)
    log_call_s = []

    def log_steps(steps: range) -> None:
        for step in steps:
            started = time.perf_counter()
            logger.log({"train/loss": _loss(step), "train/step_time_s": 0.01 * step}, step)
            log_call_s.append(time.perf_counter() - started)
            time.sleep(0.005)

    log_steps(range(0, 40))
    assert logger.flush(timeout_s=20)
    server.stop(signal.SIGKILL)
    log_steps(range(40, 80))
    deadline = time.monotonic() + 15
    while logger.available and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not logger.available  # the sender has met the outage
    log_steps(range(80, 120))  # logged while it is known to be down
    assert logger.flush(timeout_s=1.5) is False
    assert logger.pending == 160
    server.start()  # same port, same database
    log_steps(range(120, 160))
    assert logger.flush(timeout_s=30)
    assert logger.close(timeout_s=5)

    assert _history(server.uri, run_id, "train/loss") == [(step, _loss(step)) for step in range(160)]
    assert _history(server.uri, run_id, "train/step_time_s") == [(step, 0.01 * step) for step in range(160)]
    assert max(log_call_s) < 0.25, f"a log() call took {max(log_call_s):.3f} s"
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and server.uri in warnings[0] and "unavailable" in warnings[0]
    assert "Connection refused" in warnings[0] and len(warnings[0]) < 300
    back = [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME and r.levelno == logging.INFO]
    assert len(back) == 1 and "is back" in back[0]
    # the 160 records queued during the outage, plus those of steps 120-159 logged before the next retry
    queued = int(re.search(r"sending (\d+) queued", back[0]).group(1))
    assert 160 <= queued <= 240, back[0]


def test_close_returns_quickly_when_the_server_never_comes_back(dead_uri, caplog):
    logger = MetricLogger(dead_uri, "0" * 32, flush_every_s=0.1, retry_every_s=0.5)
    for step in range(10):
        logger.log({"train/loss": _loss(step)}, step)
    started = time.monotonic()
    assert logger.close(timeout_s=1.0) is False
    assert time.monotonic() - started < 3.0
    warnings = _warnings(caplog)
    assert len(warnings) == 2
    assert "unavailable" in warnings[0] and "10 metric records" in warnings[1] and "lost" in warnings[1]


def test_a_full_queue_drops_new_records_and_counts_them(dead_uri, caplog):
    logger = MetricLogger(dead_uri, "0" * 32, max_buffered=10, retry_every_s=60.0)
    for step in range(30):
        logger.log({"train/loss": _loss(step)}, step)
    assert logger.pending == 10 and logger.dropped == 20
    assert sum("is full" in w for w in _warnings(caplog)) == 1
    logger.close(timeout_s=0.5)


def test_a_resent_batch_is_stored_once(any_store):
    """The outage handling re-sends a batch whose fate is unknown; MLflow must keep identical metrics once."""
    from mlflow.entities import Metric

    run_id = _run(any_store)
    client = MlflowClient(tracking_uri=any_store)
    batch = [Metric("train/loss", _loss(step), 1_700_000_000_000 + step, step) for step in range(5)]
    client.log_batch(run_id, metrics=batch)
    client.log_batch(run_id, metrics=batch)
    assert _history(any_store, run_id, "train/loss") == [(step, _loss(step)) for step in range(5)]


def test_a_server_that_never_answers_is_given_up_on_after_request_timeout_s(caplog):
    """A port that accepts connections and never replies: MLflow alone would wait 120 s per try, 8 tries."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes handshakes; nobody ever reads or answers
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        logger = MetricLogger(uri, "0" * 32, flush_every_s=0.1, retry_every_s=60.0, request_timeout_s=1)
        started = time.monotonic()
        logger.log({"train/loss": 1.0}, 0)
        assert time.monotonic() - started < 0.05
        while logger.available and time.monotonic() - started < 10:
            time.sleep(0.05)
        assert not logger.available
        assert time.monotonic() - started < 4.0
        assert logger.close(timeout_s=0.5) is False
        assert time.monotonic() - started < 7.0
    warnings = _warnings(caplog)
    assert "unavailable (request timed out)" in warnings[0]
