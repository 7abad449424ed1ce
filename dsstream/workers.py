"""Several server processes on one port: ``dsstream serve --workers N``.

One Python process does at most about one core and a third of a streaming
server's work here: what holds the GIL (the protocol, the VAD's and
frontend's array work) fills one core, and what releases it (ONNX Runtime,
the decoder) cannot fill the rest alone (docs/benchmarks.md).  So a
machine's other cores take more processes.  The supervisor binds the
listening socket once, imports what the workers need, and forks N workers
that accept on it: they share that code and its libraries' memory
(copy-on-write) and each loads its own models and keeps its own batches and
sessions.  A worker
that dies is started again; on SIGINT or SIGTERM every worker finalizes its
open sessions first (the server's graceful shutdown).  SIGHUP reloads: each
worker in turn is replaced by a new one that loads the model files again,
and the old one stops taking connections and drains, its open sessions going
on to their own end (up to ``ServerConfig.drain_timeout_s``).

``/metrics`` answers for every worker: the worker a scrape reaches asks the
others over Unix sockets in the supervisor's folder and merges their series
under a ``worker`` label.  ``/healthz`` answers for the worker it reaches.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

__all__ = [
    "WorkerInfo",
    "merge_expositions",
    "restart_allowed",
    "newest_sockets",
    "serve_own_metrics",
    "gather_metrics",
    "listening_socket",
    "watch_parent",
    "supervise",
    "RunWorker",
]

READY_TIMEOUT_S = 600.0  # a worker loads its models before it reports ready
RESTART_LIMIT = 5  # crashes within RESTART_WINDOW_S before the supervisor gives up
RESTART_WINDOW_S = 60.0
SIBLING_TIMEOUT_S = 2.0  # a busy or restarting worker's metrics are left out after it


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker process knows of its place among the others."""

    index: int
    folder: Path  # the supervisor's folder: metrics sockets and ready files
    supervisor: int  # its process id: a worker stops when it is gone
    generation: int = 0  # a reload's replacement for a worker has the next one

    @property
    def socket_path(self) -> Path:
        return self.folder / f"worker-{self.index}-{self.generation}.sock"

    @property
    def ready_path(self) -> Path:
        return self.folder / f"ready-{self.index}-{self.generation}"

    def sibling_sockets(self) -> dict[int, Path]:
        """The other workers' metrics sockets by index: the newest generation of
        each (during a reload, a draining worker and its replacement both have one)."""
        return newest_sockets(self.folder.glob("worker-*.sock"), exclude=self.index)


# -- pure parts ------------------------------------------------------------------------


def merge_expositions(texts: Mapping[str, str]) -> bytes:
    """Prometheus text expositions by worker name -> one, every sample labelled
    ``worker="<name>"`` and each family described once."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for worker, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            merged.samples += [
                s._replace(labels={**s.labels, "worker": worker}) for s in family.samples
            ]

    class _Merged:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


def newest_sockets(paths: Iterable[Path], exclude: int | None = None) -> dict[int, Path]:
    """``worker-<index>-<generation>.sock`` paths -> the newest generation's per index."""
    newest: dict[int, tuple[int, Path]] = {}
    for path in paths:
        try:
            index, generation = (int(part) for part in path.stem.split("-")[1:3])
        except ValueError:
            continue
        if index != exclude and generation >= newest.get(index, (-1, path))[0]:
            newest[index] = (generation, path)
    return {index: path for index, (_, path) in sorted(newest.items())}


def restart_allowed(
    crashes: Sequence[float],
    now: float,
    limit: int = RESTART_LIMIT,
    window_s: float = RESTART_WINDOW_S,
) -> bool:
    """Whether to start a crashed worker again: not after ``limit`` crashes
    (monotonic seconds) within the last ``window_s`` (a worker that cannot
    start, e.g. a broken model file, would otherwise restart forever)."""
    return sum(1 for t in crashes if now - t <= window_s) < limit


# -- worker side -----------------------------------------------------------------------


async def serve_own_metrics(info: WorkerInfo, exposition: Callable[[], bytes]) -> asyncio.Server:
    """Answer each connection to this worker's Unix socket with its exposition."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(exposition())
            await writer.drain()
        finally:
            writer.close()

    info.socket_path.unlink(missing_ok=True)  # left by a worker that died
    return await asyncio.start_unix_server(answer, path=str(info.socket_path))


async def _read_sibling(path: Path) -> str | None:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path)), SIBLING_TIMEOUT_S
        )
        try:
            return (await asyncio.wait_for(reader.read(), SIBLING_TIMEOUT_S)).decode()
        finally:
            writer.close()
    except (OSError, TimeoutError):  # restarting, or too busy to answer in time
        return None


async def gather_metrics(info: WorkerInfo, own: bytes) -> bytes:
    """This worker's exposition merged with every sibling's that answers."""
    siblings = info.sibling_sockets()
    texts = await asyncio.gather(*(_read_sibling(p) for p in siblings.values()))
    by_worker = {info.index: own.decode()}
    for index, text in zip(siblings, texts):
        if text is not None:
            by_worker[index] = text
    return merge_expositions({str(i): text for i, text in sorted(by_worker.items())})


async def watch_parent(parent: int, stop: Callable[[], object], every_s: float = 1.0) -> None:
    """Call ``stop()`` when the supervisor (process ``parent``) is gone, so no
    orphaned worker keeps the port."""
    while os.getppid() == parent:
        await asyncio.sleep(every_s)
    stop()


# -- supervisor ------------------------------------------------------------------------

# A worker: given its WorkerInfo and the listening socket's file descriptor,
# serve until told to stop; returns the process's exit code.
RunWorker = Callable[[WorkerInfo, int], int]


class _Child:
    """A forked worker process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)


class _Supervisor:
    def __init__(self, run_worker: RunWorker, listener: socket.socket) -> None:
        self.run_worker = run_worker
        self.listener = listener
        self.folder = Path(tempfile.mkdtemp(prefix="dsstream-workers-"))
        self.children: dict[int, _Child] = {}
        self.generations: dict[int, int] = {}
        self.draining: list[_Child] = []  # replaced by a reload, finishing their sessions
        self.crashes: list[float] = []
        self.stopping = False
        self.reload_requested = False

    def _info(self, index: int) -> WorkerInfo:
        return WorkerInfo(index, self.folder, os.getpid(), self.generations.setdefault(index, 0))

    def spawn(self, index: int) -> None:
        """Fork a worker: it shares the supervisor's imported code and libraries
        (copy-on-write) and loads its own models."""
        info = self._info(index)
        info.ready_path.unlink(missing_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            self.children[index] = _Child(pid)
            return
        code = 1
        try:
            os.setsid()  # a terminal's Ctrl-C reaches the supervisor only, which stops us in order
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)  # not the supervisor's handlers
            code = self.run_worker(info, os.dup(self.listener.fileno()))  # the server owns the dup
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def wait_ready(self, indices: Iterable[int]) -> int | None:
        """None once these workers have loaded their models; else the exit code of
        one that died (1 when one took longer than READY_TIMEOUT_S)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        pending = set(indices)
        while pending and not self.stopping:
            for index in list(pending):
                code = self.children[index].poll()
                if code is not None:
                    return code or 1
                if self._info(index).ready_path.exists():
                    pending.discard(index)
            if time.monotonic() > deadline:
                _say(f"workers {sorted(pending)} did not start in {READY_TIMEOUT_S:g} s")
                return 1
            time.sleep(0.1)
        return None

    def reload(self) -> None:
        """Replace the workers one at a time: each replacement loads the models
        from disk again, and only once it is ready does the worker it replaces
        stop taking connections and drain (its open sessions go on to their end).
        A replacement that fails leaves the old worker serving."""
        for index in sorted(self.children):
            old = self.children[index]
            self.generations[index] += 1
            self.spawn(index)
            code = self.wait_ready([index])
            if code is not None or self.stopping:
                self.children[index].signal(signal.SIGKILL)
                self.children[index].wait(timeout=10)
                self.children[index] = old
                self.generations[index] -= 1
                if not self.stopping:
                    _say(f"reload: worker {index}'s replacement failed ({code}); "
                         "the old workers go on serving")  # fmt: skip
                return
            old.signal(signal.SIGUSR1)  # drain
            self.draining.append(old)
        _say(f"reload: {len(self.children)} workers replaced; the old ones drain")

    def watch(self) -> int:
        while not self.stopping:
            if self.reload_requested:
                self.reload_requested = False
                self.reload()
            self.draining = [child for child in self.draining if child.poll() is None]
            for index, child in list(self.children.items()):
                code = child.poll()
                if code is None or self.stopping:
                    continue
                now = time.monotonic()
                self.crashes.append(now)
                if not restart_allowed(self.crashes, now):
                    _say(f"worker {index} exited ({code}) {RESTART_LIMIT} times within "
                         f"{RESTART_WINDOW_S:g} s; stopping")  # fmt: skip
                    return 1
                _say(f"worker {index} exited ({code}); starting it again")
                self.spawn(index)
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
        everyone = [*self.children.values(), *self.draining]
        for child in everyone:
            child.signal(signal.SIGTERM)  # each finalizes its sessions, then exits
        for child in everyone:
            if not child.wait(timeout=60):
                child.signal(signal.SIGKILL)
                child.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)


def supervise(
    run_worker: RunWorker,
    workers: int,
    host: str,
    port: int,
    announce: Callable[[int], None],
    preload: Callable[[], None] = lambda: None,
) -> int:
    """Serve on one listening socket with ``workers`` forked processes, each
    running ``run_worker``, until SIGINT/SIGTERM; ``announce(port)`` once all
    are ready.  ``preload()`` runs once before the first fork (imports the
    workers share instead of each making its own copy).  Returns the exit code."""
    listener = socket.create_server((host, port), family=_family(host), backlog=1024)
    sup = _Supervisor(run_worker, listener)

    def on_signal(signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            sup.reload_requested = True
        else:
            sup.stopping = True

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in signals}
    try:
        preload()
        gc.freeze()  # the shared objects stay out of the children's collections (fewer copies)
        for index in range(workers):
            sup.spawn(index)
        code = sup.wait_ready(range(workers))
        if code is not None:
            return code
        if not sup.stopping:
            announce(listener.getsockname()[1])
        return sup.watch()
    finally:
        sup.stop()
        listener.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _say(message: str) -> None:
    print(f"dsstream serve: {message}", file=sys.stderr, flush=True)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listening_socket(fd: int) -> socket.socket:
    """The supervisor's listening socket, inherited as file descriptor ``fd``."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock
