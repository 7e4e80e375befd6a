"""MLflow requests of a training run, by the thread that makes them: none on the training thread per step.

    python jobs/benchmark.py tracking                     # 20 and 60 steps, a checkpoint every 10

A real `mlflow server` (sqlite, its own artifact store) on 127.0.0.1 and `run_training` in this process
(`LocalContext`, the demo model on the digits shards, one rank: what rank 0 does on a cluster). Every HTTP request
that MLflow's client sends is counted at `requests.Session.send`, with the thread it came from:
  training     the thread that runs the steps: the attempt's start (its run, the carried steps) and its end;
  metrics      the two senders of step metrics (the job's run and the attempt's), which batch every 2 s;
  models       the maker of the checkpoints' logged models (models.py).
Two runs of --short and --long steps, with the same checkpoint interval, show which counts grow with the steps.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date

from pipeline.tracking.store import TrackingUnavailable, check_tracking_reachable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--short", type=int, default=20, help="steps of the short run")
    parser.add_argument("--long", type=int, default=60, help="steps of the long run")
    parser.add_argument("--checkpoint-every", type=int, default=10)


def kind_of(thread: threading.Thread) -> str:
    if thread is threading.main_thread():
        return "training"
    return "models" if thread.name.startswith("mlflow-models-") else \
        "metrics" if thread.name.startswith("mlflow-metrics-") else thread.name


def start_server(root: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", f"{root}/artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            check_tracking_reachable(uri, timeout_s=2)
            return server, uri
        except TrackingUnavailable:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("mlflow server did not start") from None
            time.sleep(0.5)


def run(args: argparse.Namespace) -> None:
    import requests

    from pipeline.config import load_job_config
    from pipeline.data.shard_writer import ensure_digits_shards
    from pipeline.tracking.runs import start_job_run
    from pipeline.train.context import LocalContext
    from pipeline.train.loop import run_training
    from pipeline.train.resolved_job import resolve_job

    calls: collections.Counter = collections.Counter()
    counting = threading.local()
    send = requests.Session.send

    def counted_send(session, request, **kwargs):
        if getattr(counting, "on", True):
            calls[kind_of(threading.current_thread())] += 1
        return send(session, request, **kwargs)

    root = tempfile.mkdtemp(prefix="bench-tracking-")
    server, uri = start_server(root)
    rows = []
    try:
        ensure_digits_shards(f"{root}/digits/train-*.tar", img_size=32)
        requests.Session.send = counted_send
        for steps in (args.short, args.long):
            job = load_job_config("jobs/configs/digits_pretrain.yaml", [
                f"data.train={root}/digits/train-*.tar", f"data.val={root}/digits/val-*.tar",
                "train.num_workers=1", f"train.steps={steps}", "train.log_every_n_steps=5",
                f"train.checkpoint_every_n_steps={args.checkpoint_every}",
                f"train.eval_every_n_steps={args.checkpoint_every}",
                f"tracking.uri={uri}", f"train.storage_path={root}/runs"])
            counting.on = False  # the driver's side (creating the job's run) is not the training's
            run_, _ = resolve_job(job, "pretrain")
            run_id = start_job_run(uri=uri, experiment="bench-tracking", run_name=f"steps-{steps}", job="pretrain",
                                   config=run_.params())
            counting.on = True
            calls.clear()
            start = time.perf_counter()
            run_training(dataclasses.replace(run_, mlflow_run_id=run_id), LocalContext(f"{root}/local-{steps}"))
            rows.append((steps, steps // args.checkpoint_every, dict(calls), time.perf_counter() - start))
    finally:
        requests.Session.send = send
        server.terminate()
        server.wait(timeout=30)
    kinds = ("training", "metrics", "models")
    print(f"MLflow requests of `run_training` by thread, against a real `mlflow server` on 127.0.0.1 "
          f"({platform.node()}, {os.cpu_count()} cores, {date.today()}; `python jobs/benchmark.py tracking`)\n")
    print("| steps | checkpoints | wall s | " + " | ".join(f"{kind} thread" for kind in kinds) + " |")
    print("|---|---|---|" + "---|" * len(kinds))
    for steps, checkpoints, counted, wall_s in rows:
        print(f"| {steps} | {checkpoints} | {wall_s:.0f} | " + " | ".join(str(counted.get(k, 0)) for k in kinds) + " |")
    (short, short_ckpt, a, _), (long, long_ckpt, b, _) = rows
    print(f"\nadded from {short} to {long} steps: training thread {b.get('training', 0) - a.get('training', 0)} "
          f"requests ({(b.get('training', 0) - a.get('training', 0)) / (long - short):.2f} per step); models thread "
          f"{(b.get('models', 0) - a.get('models', 0)) / (long_ckpt - short_ckpt):.1f} per checkpoint; metrics "
          f"threads {b.get('metrics', 0) - a.get('metrics', 0)} (a batch per run every 2 s, whatever the steps)")
