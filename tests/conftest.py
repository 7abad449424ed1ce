import asyncio
import contextlib
import functools
import io
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


def _use_triton_interpreter() -> None:
    """Without a GPU, run the Triton kernels on the CPU through Triton's interpreter
    (how CI tests them).  It is chosen when a kernel is decorated, so this must
    happen before kernels is imported."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_use_triton_interpreter()

from dsstream.protocol import Limits  # noqa: E402
from dsstream.server import ServerConfig, StreamServer  # noqa: E402


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def async_test(fn):
    """Run an async test function in a fresh event loop (no plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), timeout=120))

    return wrapper


@contextlib.asynccontextmanager
async def running_server(registry, limits: Limits | None = None, **config):
    server = StreamServer(registry, ServerConfig(port=0, limits=limits or Limits(), **config))
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


@contextlib.contextmanager
def server_thread(registry, **config):
    """A server on its own thread's event loop, for blocking callers (the CLI in a
    subprocess, BlockingClient); yields its ws:// URL."""
    import threading

    ready, holder = threading.Event(), {}

    async def serve():
        async with running_server(registry, **config) as server:
            holder["url"], holder["stop"] = server.url, asyncio.Event()
            ready.set()
            await holder["stop"].wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    try:
        assert ready.wait(60), "the server did not start"
        yield holder["url"]
    finally:
        if "stop" in holder:
            loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(30)


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


def png_bytes(width: int = 32, height: int = 24, fmt: str = "PNG") -> bytes:
    from PIL import Image

    img = Image.new("RGB", (width, height), (200, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# A tiny word LM's text, shared by the decoder tests (test_decoding, test_lexicon).
LM_SENTENCES = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog met on the mat",
    "the quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore",
    "the weather is nice today",
    "we met the cat near the dog",
    "the cat is on the mat today",
] * 3


@pytest.fixture(scope="session")
def lm_path(tmp_path_factory):
    """A trigram ARPA model of ``LM_SENTENCES``."""
    from dsstream.lm import build_lm, write_arpa

    path = tmp_path_factory.mktemp("lm") / "lm.arpa"
    write_arpa(build_lm([s.split() for s in LM_SENTENCES], order=3), path)
    return path
