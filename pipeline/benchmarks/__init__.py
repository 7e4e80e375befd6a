"""Benchmark suites run by jobs/benchmark.py; each module has add_arguments(parser) and run(args)."""

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group or a local server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
