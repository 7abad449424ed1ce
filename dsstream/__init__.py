"""dsstream: streaming speech and multimodal applications.

Three ways in: a WebSocket service (``dsstream serve``), an embeddable SDK
(this package), and the inference engine (the ``engine`` package).
"""

__version__ = "0.1.0"

from dsstream.client import BlockingClient, Client, ServerError  # noqa: E402
from dsstream.local import LocalSession  # noqa: E402
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
