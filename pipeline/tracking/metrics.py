"""Step metrics from rank 0 into a run the driver created, without ever stalling or killing training.

`MetricLogger.log()` only appends `(key, value, timestamp_ms, step)` records to an in-memory queue under a
lock (microseconds, no I/O). A daemon sender thread ships the queue with `MlflowClient.log_batch`, at most
every `flush_every_s` seconds, or as soon as a full request's worth (`batch_size`, MLflow's 1,000 metrics per
request) is waiting. So a slow or dead tracking server can delay metrics but never a training step.

An outage: the first failed send logs ONE warning and the records stay queued (timestamps and steps as
logged). The sender retries every `retry_every_s` seconds; the first success logs one "back" line and
drains the queue in order. A batch is removed from the queue only after MLflow accepted it, and a re-sent
batch is identical, so a send that failed after the server had stored it is not stored twice: MLflow's
store treats an identical (key, step, timestamp, value) as the same metric.

While the queue is full (`max_buffered` records) new records are dropped and counted, with one warning.
A batch MLflow rejects as invalid (a bad metric name) is split until the bad records are found; those are
dropped with one warning each, and the rest is logged.

Non-finite values are logged as they are: MLflow stores NaN as NaN and ±inf as ±1.797e308 (the largest
double), and a NaN loss is exactly what someone looking at a diverged run needs to see. Values that are not
numbers at all are skipped, with one warning per metric name.

Bounded waits: MLflow's HTTP client retries a failed request 7 times with exponential backoff and waits
120 s per attempt by default, minutes in all. Those settings are environment variables read on every
request, so the sender sets MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 and MLFLOW_HTTP_REQUEST_TIMEOUT to
`request_timeout_s` around its own sends only (this logger does its own retrying; see
`pipeline.internals.bounded_mlflow_http`), and puts the previous values back afterwards. `flush()` and
`close()` wait at most their `timeout_s`.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, NamedTuple

from pipeline.internals import bounded_mlflow_http

log = logging.getLogger(__name__)

try:  # MLflow's per-request limit, so that a future change of it is followed
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH
except ImportError:  # pragma: no cover - the value of mlflow 3.17
    MAX_METRICS_PER_BATCH = 1000

class _Record(NamedTuple):
    key: str
    value: float
    timestamp_ms: int
    step: int


class MetricLogger:
    """Log step metrics into an existing run; never raises into the caller, never blocks on the network.

    logger = MetricLogger(uri, run_id)
    logger.log({"train/loss": 1.93, "train/lr": 3e-4}, step=120)
    ...
    logger.close()   # flushes, waiting at most timeout_s
    """

    def __init__(
        self,
        uri: str,
        run_id: str,
        *,
        max_buffered: int = 100_000,
        flush_every_s: float = 2.0,
        retry_every_s: float = 5.0,
        request_timeout_s: int = 5,
        batch_size: int = MAX_METRICS_PER_BATCH,
    ):
        self.uri = uri
        self.run_id = run_id
        self.max_buffered = max_buffered
        self.flush_every_s = flush_every_s
        self.retry_every_s = retry_every_s
        self.request_timeout_s = max(1, int(request_timeout_s))
        self.batch_size = max(1, min(batch_size, MAX_METRICS_PER_BATCH))
        self._queue: deque[_Record] = deque()
        self._lock = threading.Lock()
        self._settled_cond = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._accepted = 0  # records queued so far
        self._settled = 0  # records that left the queue: sent, or rejected by MLflow as invalid
        self._sent = 0
        self._dropped = 0  # records refused because the queue was full
        self._rejected = 0
        self._flush_requested = False
        self._closing = False
        self._closed = False
        self._down_since: float | None = None
        self._warned: set[str] = set()
        self._client = None
        self._thread = threading.Thread(target=self._run_sender, name=f"mlflow-metrics-{run_id[:8]}", daemon=True)
        self._thread.start()

    # ---- the caller's side: cheap, never raises ------------------------------------------------------

    def log(self, metrics: Mapping[str, Any], step: int, timestamp_ms: int | None = None) -> None:
        """Queue `metrics` at `step`, stamped now (or at `timestamp_ms`). Returns at once; never raises."""
        try:
            timestamp_ms = time.time_ns() // 1_000_000 if timestamp_ms is None else int(timestamp_ms)
            step = int(step)
            records = []
            for key, value in metrics.items():
                number = self._as_float(key, value)
                if number is not None:
                    records.append(_Record(str(key), number, timestamp_ms, step))
            if not records:
                return
            with self._lock:
                if self._closed:
                    self._warn_once("closed", "MetricLogger for run %s is closed; metrics dropped", self.run_id)
                    return
                room = self.max_buffered - len(self._queue)
                if room < len(records):
                    self._dropped += len(records) - max(room, 0)
                    records = records[: max(room, 0)]
                    self._warn_once(
                        "full",
                        "MLflow metric queue for run %s is full (%d records); dropping new metrics until it drains",
                        self.run_id,
                        self.max_buffered,
                    )
                self._queue.extend(records)
                self._accepted += len(records)
                due = len(self._queue) >= self.batch_size
            if due:
                self._wake.set()
        except Exception as exc:  # a bug here must not end a training run
            self._warn_once("log-error", "MetricLogger.log failed (%s); metrics skipped", exc)

    def _as_float(self, key: Any, value: Any) -> float | None:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self._warn_once(f"nan-type:{key}", "metric %r has a non-numeric value %r; skipping it", key, value)
            return None
        if not math.isfinite(number):
            self._warn_once(f"nonfinite:{key}", "metric %r is %s at least once; logged as is", key, number)
        return number

    def flush(self, timeout_s: float = 30) -> bool:
        """Send everything logged so far; True when all of it was settled within timeout_s. Never raises.

        Settled means accepted by MLflow, or rejected by it as invalid (a bad metric name, warned about once).
        """
        try:
            deadline = time.monotonic() + max(0.0, timeout_s)
            with self._lock:
                target = self._accepted
                self._flush_requested = True
            self._wake.set()
            with self._settled_cond:
                while self._settled < target:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._thread.is_alive():
                        return False
                    self._settled_cond.wait(min(remaining, 0.5))
            return True
        except Exception as exc:
            self._warn_once("flush-error", "MetricLogger.flush failed (%s)", exc)
            return False

    def close(self, timeout_s: float = 30) -> bool:
        """Flush (waiting at most timeout_s), then stop the sender; True when nothing was left unsent. Never raises."""
        delivered = self.flush(timeout_s)
        with self._lock:
            self._closing = True
            self._closed = True
        self._wake.set()  # the sender makes one last attempt, bounded by request_timeout_s, then exits
        self._thread.join(timeout=min(max(timeout_s, 0.0), self.request_timeout_s + 1.0))
        unsent = self.pending
        if unsent:
            log.warning(
                "MLflow run %s: %d metric records could not be sent to %s and are lost", self.run_id, unsent, self.uri
            )
        return delivered and unsent == 0

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Records queued and not yet accepted by MLflow."""
        with self._lock:
            return len(self._queue)

    @property
    def accepted(self) -> int:
        """Records queued so far: the mark `settled` reaches once MLflow has them (records leave in order)."""
        with self._lock:
            return self._accepted

    @property
    def settled(self) -> int:
        """Records that left the queue so far: accepted by MLflow, or rejected by it as invalid."""
        with self._lock:
            return self._settled

    @property
    def dropped(self) -> int:
        """Records refused because the queue was full."""
        with self._lock:
            return self._dropped

    @property
    def sent(self) -> int:
        """Records MLflow accepted."""
        with self._lock:
            return self._sent

    @property
    def available(self) -> bool:
        """False while the tracking store is failing."""
        return self._down_since is None

    # ---- the sender thread ---------------------------------------------------------------------------

    def _run_sender(self) -> None:
        next_try_s = 0.0  # monotonic time of the next attempt while the store is down
        while True:
            if self._down_since is None:
                self._wake.wait(timeout=self.flush_every_s)
            else:
                self._wake.wait(timeout=max(0.0, next_try_s - time.monotonic()))
            self._wake.clear()
            with self._lock:
                closing = self._closing
                asked = self._flush_requested or closing
                self._flush_requested = False
            if self._down_since is not None and not asked and time.monotonic() < next_try_s:
                continue  # during an outage a full queue does not make us retry sooner, only flush/close do
            try:
                self._drain()
            except Exception as exc:  # keep the sender alive whatever happens
                self._warn_once("sender-error", "MLflow metric sender hit %r; will retry", exc)
                self._mark_down(exc)
            if self._down_since is not None:
                next_try_s = time.monotonic() + self.retry_every_s
            if closing:
                return

    def _drain(self) -> None:
        while True:
            with self._lock:
                batch = [self._queue[i] for i in range(min(self.batch_size, len(self._queue)))]
            if not batch:
                return
            outcome = self._send(batch)
            if outcome == "down":
                return
            with self._settled_cond:
                for _ in batch:
                    self._queue.popleft()
                self._settled += len(batch)
                self._settled_cond.notify_all()

    def _send(self, batch: list[_Record]) -> str:
        """Send one batch: "sent", "down" (retry later, batch kept) or "split" (invalid records dropped)."""
        try:
            self._log_batch(batch)
        except Exception as exc:
            if not _is_permanent(exc):
                self._mark_down(exc)
                return "down"
            try:
                self._send_valid_part(batch, exc)
            except Exception as again:  # the store went away mid-split: keep the whole batch for later
                self._mark_down(again)
                return "down"
            return "split"
        self._mark_up()
        with self._lock:
            self._sent += len(batch)
        return "sent"

    def _send_valid_part(self, batch: list[_Record], error: Exception) -> None:
        """Bisect a batch MLflow rejected as invalid: log the valid records, drop the invalid ones."""
        if len(batch) == 1:
            record = batch[0]
            with self._lock:
                self._rejected += 1
            self._warn_once(
                f"rejected:{record.key}",
                "MLflow rejected metric %r (step %d): %s; dropping it",
                record.key,
                record.step,
                _one_line(error),
            )
            return
        middle = len(batch) // 2
        for half in (batch[:middle], batch[middle:]):
            try:
                self._log_batch(half)
            except Exception as exc:
                if not _is_permanent(exc):
                    raise
                self._send_valid_part(half, exc)
            else:
                with self._lock:
                    self._sent += len(half)

    def _log_batch(self, batch: list[_Record]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(r.key, r.value, r.timestamp_ms, r.step) for r in batch]
        with bounded_mlflow_http(self.request_timeout_s):
            if self._client is None:
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(tracking_uri=self.uri)
            self._client.log_batch(self.run_id, metrics=metrics)

    def _mark_down(self, error: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "MLflow tracking at %s is unavailable (%s); training goes on, metrics are kept in memory "
                "and sent when it is back (retry every %g s)",
                self.uri,
                _one_line(error),
                self.retry_every_s,
            )

    def _mark_up(self) -> None:
        if self._down_since is not None:
            outage_s = time.monotonic() - self._down_since
            self._down_since = None
            log.info(
                "MLflow tracking at %s is back after %.0f s; sending %d queued metric records",
                self.uri,
                outage_s,
                self.pending,  # the batch just sent is still counted: it leaves the queue after this
            )

    def _warn_once(self, topic: str, message: str, *args: object) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            log.warning(message, *args)


def _is_permanent(error: Exception) -> bool:
    """True for errors that a retry cannot fix (MLflow's 4xx answers other than 408/429)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(error, MlflowException):
        return False
    try:
        status = int(error.get_http_status_code())
    except Exception:
        return False
    return 400 <= status < 500 and status not in (408, 429)


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    # urllib3 nests the cause that matters ("[Errno 111] Connection refused") deep in its repr
    os_error = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if os_error:
        return os_error.group(0).strip()
    if "timed out" in text.lower():
        return "request timed out"
    return text if len(text) <= 200 else text[:197] + "..."
