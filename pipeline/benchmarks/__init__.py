"""Benchmark suites run by jobs/benchmark.py; each module has add_arguments(parser) and run(args)."""

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group or a local server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def chosen_modes(text: str, modes: tuple[str, ...] | list[str]) -> list[str]:
    """The modes of a comma-separated --modes, each one of `modes`, else a one-line SystemExit."""
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = set(chosen) - set(modes)
    if unknown:
        raise SystemExit(f"unknown --modes {', '.join(sorted(unknown))}; choose from {', '.join(modes)}")
    return chosen
