"""Fixtures of the distributed tests: a Dask cluster that is always closed, scheduler warnings
as errors, graph submissions counted, other processes started with a timeout and stopped, and a
check that nothing the session started is left running.

These tests run in ``nox -s distributed`` only (``pytest spec_tests/distributed --distributed``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent.parent

# multiprocessing's helpers live as long as the interpreter that started them (they exit when
# it does), so they are not processes left behind by a test.
_INTERPRETER_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _children() -> dict[int, str]:
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            out[p.pid] = " ".join(p.cmdline())
        except psutil.Error:  # it ended while we looked
            continue
    return out


TEST_LIMIT_S = 480


@pytest.fixture(autouse=True)
def time_limit(request: pytest.FixtureRequest) -> Iterator[None]:
    """No test runs for ever: past TEST_LIMIT_S it fails with a TimeoutError raised in the
    main thread, so that the fixtures still close clusters and stop processes."""
    if not hasattr(signal, "SIGALRM"):  # Windows: the scripts' own timeouts remain
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"{request.node.nodeid} ran past {TEST_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Every process a test starts (cluster workers, nannies, ranks, JAX scripts) has ended
    when the test ends."""
    before = set(_children())
    yield
    import psutil

    left = {
        pid: cmd
        for pid, cmd in _children().items()
        if pid not in before and not any(h in cmd for h in _INTERPRETER_HELPERS)
    }
    if left:
        _, alive = psutil.wait_procs([psutil.Process(pid) for pid in left], timeout=10)
        left = {p.pid: left[p.pid] for p in alive}
    assert not left, f"processes left running after the test: {left}"


class _Warnings(logging.Handler):
    """Collects WARNING and above from the loggers of dask.distributed (the scheduler of a
    LocalCluster runs in this process)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


class Cluster:
    """A running ``LocalCluster`` with its ``Client`` (the default scheduler meanwhile)."""

    def __init__(self, cluster: Any, client: Any, handler: _Warnings) -> None:
        self.cluster = cluster
        self.client = client
        self._handler = handler

    def graphs(self) -> int:
        """How many graphs (``update_graph`` calls) the scheduler has received so far."""
        return int(self.client.run_on_scheduler(_graph_count))

    def warnings(self) -> list[str]:
        """Warnings logged so far in this process (the scheduler, the client, and the
        nannies, which restart a worker that outgrows its memory limit) and by the workers,
        but for the reports of a worker's memory manager (``distributed.worker.memory``:
        pausing at the limit until memory is freed, memory the allocator has not returned to
        the OS), which is how a worker keeps to a tight limit, not a fault."""
        out = list(self._handler.messages)
        for worker, records in self.client.get_worker_logs().items():
            out += [
                f"worker {worker}: {msg}"
                for level, msg in records
                if level in _BAD and not _MEMORY_MANAGER.search(msg)
            ]
        return out


_BAD = ("WARNING", "ERROR", "CRITICAL")
_MEMORY_MANAGER = re.compile(r"\bdistributed\.worker\.memory\b")
_PLUGIN = "regularizers-graph-counter"


def _graph_count(dask_scheduler: Any) -> int:
    return int(dask_scheduler.plugins[_PLUGIN].count)


def _counter() -> Any:
    from distributed.diagnostics.plugin import SchedulerPlugin

    class GraphCounter(SchedulerPlugin):  # type: ignore[misc]
        name = _PLUGIN

        def __init__(self) -> None:
            self.count = 0

        def update_graph(self, scheduler: Any, **kwargs: Any) -> None:
            self.count += 1

    return GraphCounter()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """Two worker processes on 127.0.0.1, one thread and 256 MiB each; closed after the test,
    which fails if the scheduler or a worker logged a warning."""
    from distributed import Client, LocalCluster

    handler = _Warnings()
    logger = logging.getLogger("distributed")
    logger.addHandler(handler)
    try:
        with (
            LocalCluster(
                processes=True,
                n_workers=2,
                threads_per_worker=1,
                dashboard_address=None,
                host="127.0.0.1",
                memory_limit="256MiB",
            ) as local,
            Client(local) as client,
        ):
            client.register_plugin(_counter())
            state = Cluster(local, client, handler)
            yield state
            found = state.warnings()
    finally:
        logger.removeHandler(handler)
    assert not found, "dask.distributed logged warnings:\n" + "\n".join(found)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_scripts(commands: list[list[str]], *, env: dict[str, str], timeout: float) -> list[str]:
    """Start the scripts of this folder (``[name, *args]``) together, wait for all (killing
    every one at ``timeout``), and return their outputs; a nonzero exit fails the test with
    every output."""
    full_env = {**os.environ, **env}
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / cmd[0]), *cmd[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
            cwd=ROOT,
        )
        for cmd in commands
    ]
    outputs: list[str] = []
    try:
        for p in procs:
            try:
                out, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                out, _ = p.communicate()
                pytest.fail(f"{p.args} ran past {timeout} s; output:\n{out}")
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [
        (p.args, p.returncode, o) for p, o in zip(procs, outputs, strict=True) if p.returncode
    ]
    if failed:
        pytest.fail(
            "\n\n".join(f"{args} exited with {rc}; output:\n{out}" for args, rc, out in failed)
        )
    return outputs
