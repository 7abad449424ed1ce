"""dsstream: streaming speech and multimodal applications.

Three ways in: a WebSocket service (``dsstream serve``), an embeddable SDK
(this package), and the inference engine (the ``engine`` package).
"""

__version__ = "0.1.0"

from dsstream.client import BlockingClient, Client, ServerError  # noqa: E402
from dsstream.local import LocalSession, Transcript, transcribe  # noqa: E402
from dsstream.options import AsrOptions, EndpointOptions, Hotword, VqaOptions  # noqa: E402
from dsstream.protocol import (  # noqa: E402
    Answer,
    Ended,
    Endpoint,
    Error,
    ErrorCode,
    Final,
    Partial,
    Started,
    Word,
)

__all__ = [
    "__version__",
    "Client",
    "BlockingClient",
    "ServerError",
    "LocalSession",
    "Transcript",
    "transcribe",
    "AsrRuntime",
    "AsrPipeline",
    "AsrOptions",
    "VqaOptions",
    "EndpointOptions",
    "Hotword",
    "Started",
    "Partial",
    "Final",
    "Endpoint",
    "Answer",
    "Ended",
    "Error",
    "ErrorCode",
    "Word",
]


def __getattr__(name: str):  # the ASR runtime imports torch: load it on first use only
    if name in ("AsrRuntime", "AsrPipeline"):
        from dsstream.pipelines import asr

        return getattr(asr, name)
    raise AttributeError(f"module 'dsstream' has no attribute {name!r}")
