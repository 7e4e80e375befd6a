"""Real Ray heads and MLflow servers for the cluster tests, started and stopped with cluster/local.sh.

Each head gets its own ports, state folder and Ray session folder, so it never meets the session's `ray_local`
or anyone else's Ray on the machine; it is stopped by PID (local.sh stop), and teardown checks that none of its
processes is left. Subprocesses get their environment explicitly: the test process's own Ray settings
(RAY_ADDRESS, RAY_AUTH_*) never reach them, and nothing here makes `ray.init()` in this process attach to a head.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL_SH = ROOT / "cluster" / "local.sh"
BIN = Path(sys.executable).parent
RAY_WORKER_PORTS = range(10002, 20000)  # ray start's default worker port range: no other head port may be in it
# one decode task at a time is plenty for digits, and spares the 2-core machine the start of more task workers
# (each imports torch and torchvision: about 7 s of CPU)
TINY = ("train.global_batch_size=16", "optim.warmup_steps=2", "train.log_every_n_steps=1",
        "data.local_shuffle_buffer=0", "data.decode_concurrency=1", "train.eval_every_n_steps=0",
        "train.checkpoint_every_n_steps=0")


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_WORKER_PORTS:
            return port


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without its Ray address and auth settings and without the session's S3
    settings (a job gets those only the way users give them, through its runtime env), plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_", "AWS_"))
           and k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


class Job:
    """A `ray job submit` running in the background; its output lines are kept with their arrival times."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.started = time.monotonic()
        self.env = env
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self.process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, errors="replace", start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout_s: float) -> float:
        """Seconds from submit to the first output line matching `pattern`; fails on timeout or job end."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for at, line in self.lines:
                    if regex.search(line):
                        return at - self.started
                if self.process.poll() is not None and not self._reader.is_alive():
                    pytest.fail(f"job ended (rc {self.process.returncode}) before /{pattern}/:\n{self.tail()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no /{pattern}/ within {timeout_s:.0f} s:\n{self.tail()}")
                self._cond.wait(0.5)

    def finish(self, timeout_s: float) -> int:
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"job still running after {timeout_s:.0f} s:\n{self.tail()}")
        self._reader.join(timeout=10)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)  # the submit client only: the job itself dies with its head
            self.process.wait()

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


class LocalCluster:
    """A head (and optionally an MLflow server) run by cluster/local.sh with a private state folder and ports."""

    def __init__(self, state: Path, *, auth: str = "token", autoscaling_config: Path | None = None):
        self.state = state
        self.temp_dir = tempfile.mkdtemp(prefix="vitc-", dir="/tmp")  # short: Ray's Unix sockets live under it
        self.gcs_port, self.dashboard_port, self.client_port, self.agent_port, self.mlflow_port = (
            free_port() for _ in range(5))
        self.auth = auth
        self.env = clean_env(VIT_CLUSTER_DIR=str(state), RAY_TEMP_DIR=self.temp_dir, RAY_AUTH=auth,
                             RAY_GCS_PORT=str(self.gcs_port), RAY_DASHBOARD_PORT=str(self.dashboard_port),
                             RAY_CLIENT_PORT=str(self.client_port), RAY_AGENT_PORT=str(self.agent_port),
                             MLFLOW_PORT=str(self.mlflow_port), RAY_NUM_CPUS="4")
        self.working_dir = "."
        if autoscaling_config is not None:
            self.env["RAY_AUTOSCALING_CONFIG"] = str(autoscaling_config)
            # The fake nodes are all this machine and share the head's session folder. A working dir uploaded with
            # `--working-dir .` is unpacked there, and each node that joins deletes and unpacks it again under the
            # processes already running in it (Ray's working_dir plugin unpacks with overwrite=True): a Train
            # worker whose cwd vanished dies in `import torch` (oneMKL "Cannot load libtorch_cpu.so"). `local://`
            # names a folder that is already on every node, so nothing is unpacked.
            self.working_dir = f"local://{ROOT}"

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def token(self) -> str:
        return (self.state / "auth_token").read_text().strip()

    def local_sh(self, command: str, timeout_s: float = 240) -> str:
        result = subprocess.run([str(LOCAL_SH), command], env=self.env, capture_output=True, text=True,
                                timeout=timeout_s, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"local.sh {command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def client_env(self, *, token: str | None = "head") -> dict[str, str]:
        """The environment of a client of this head: with its token (default), another token, or none."""
        if token is None:
            return clean_env(RAY_AUTH_MODE="disabled")
        return clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token if token == "head" else token)

    def submit(self, *entrypoint: str, token: str | None = "head", extra: tuple[str, ...] = ()) -> Job:
        args = [str(BIN / "ray"), "job", "submit", "--address", self.address, "--working-dir", self.working_dir,
                *extra, "--", *entrypoint]
        return Job(args, self.client_env(token=token))

    def api(self, path: str) -> dict:
        """GET on the dashboard's HTTP API, with the token."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.auth == "token" else {}
        request = urllib.request.Request(self.address + path, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def nodes(self) -> list[dict]:
        return self.api("/api/v0/nodes?limit=1000&detail=1")["data"]["result"]["result"]

    def processes(self) -> list[psutil.Process]:
        """Live processes that name this head's session folder."""
        found = []
        for process in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir + "/" in part for part in process.info["cmdline"] or ()):
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def stop(self) -> None:
        """local.sh stop; then whatever still names the session folder is killed by PID, and reported."""
        try:
            self.local_sh("stop", timeout_s=120)
        finally:
            left = self.processes()
            for process in left:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            assert not left, f"local.sh stop left {len(left)} processes of the head behind: {[p.pid for p in left]}"


@pytest.fixture(scope="session")
def local_cluster():
    return LocalCluster


class S3Chain:
    """Shards in the session's S3 bucket (`s3_store`), and what a job submitted to a head needs to use them."""

    def __init__(self, store, prefix: str):
        self.store = store
        self.prefix = prefix  # s3://bucket/…: the shards under /digits, checkpoints under /runs
        # how users hand a job its S3 settings: the runtime env (docs/operations.md)
        self.runtime_env = ("--runtime-env-json", json.dumps({"env_vars": store.env}))

    def overrides(self, *more: str) -> list[str]:
        return [f"data.train={self.prefix}/digits/train-*.tar", f"data.val={self.prefix}/digits/val-*.tar",
                f"train.storage_path={self.prefix}/runs", *TINY, *more]


@pytest.fixture(scope="session")
def s3_chain(s3_store):
    """The digits shards written to the bucket by `python jobs/make_shards.py --out s3://…`, run as a user
    runs it (its S3 settings in its environment)."""
    chain = S3Chain(s3_store, s3_store.uri("cluster"))
    done = subprocess.run([str(BIN / "python"), "jobs/make_shards.py", "--out", f"{chain.prefix}/digits",
                           "--no-progress"], cwd=ROOT, env=clean_env(**s3_store.env), capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"train: 1438 samples, 2 shards, 5.5 MiB, 0 skipped -> {chain.prefix}/digits" in done.stdout, done.stdout
    return chain


@pytest.fixture(scope="session")
def tiny_overrides():
    def overrides(shards: Path, workdir: Path, *more: str) -> list[str]:
        return [f"data.train={shards}/train-*.tar", f"data.val={shards}/val-*.tar",
                f"train.storage_path={workdir}/runs", *TINY, *more]
    return overrides


def wait_until(predicate, timeout_s: float, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every_s)


@pytest.fixture(scope="session")
def poll():
    return wait_until
