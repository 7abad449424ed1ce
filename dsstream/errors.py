"""One error vocabulary for the whole package: stable codes, WebSocket close
codes, and the one coded exception every layer raises.

A refused option, a malformed message and a frame a pipeline cannot use are
the same thing to a client: an ``error`` event with a code, a message and
whether the session ends.  :class:`CodedError` carries exactly that; the
specific classes (``OptionsError``, ``ProtocolError``, ``PipelineError``) only
say where it was raised, so a handler catches ``CodedError`` and sends it as it
is, with no conversion between them.  Nothing here imports another module of
the package.
"""

from __future__ import annotations

import enum

__all__ = ["CloseCode", "CodedError", "ErrorCode", "close_code_for"]


class ErrorCode(enum.StrEnum):
    """Stable error codes sent in ``error`` events."""

    BAD_MESSAGE = "bad_message"  # malformed JSON, unknown type, invalid field, wrong state
    BAD_AUDIO = "bad_audio"  # audio bytes that do not fit the declared encoding
    BAD_IMAGE = "bad_image"  # unreadable, unsupported or oversized image
    TOO_LARGE = "too_large"  # a frame above the server's max_frame_bytes
    UNSUPPORTED = "unsupported"  # a valid request the server cannot honour (encoding, rate)
    BUSY = "busy"  # the server is at its session limit; retry later
    UNAUTHORIZED = "unauthorized"  # missing or wrong bearer token, or origin not allowed
    MODEL_UNAVAILABLE = "model_unavailable"  # the task's model is not installed
    NO_IMAGE = "no_image"  # a question before any image in a vqa session
    TIMEOUT = "timeout"  # idle timeout or maximum session duration reached
    INTERNAL = "internal"  # a server-side failure; the session ends, the server goes on
    # The connection closed before ``ended``: the process serving the session
    # stopped (a killed worker, a lost Ray Serve replica).  Reported by the
    # clients, which saw it happen; start a new session, another process takes it.
    UNAVAILABLE = "unavailable"


class CloseCode(enum.IntEnum):
    """WebSocket close codes (RFC 6455, section 7.4.1) the server uses."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down
    POLICY_VIOLATION = 1008  # unauthorized
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # busy


# The close code that goes with each fatal error.
_FATAL_CLOSE = {
    ErrorCode.UNAUTHORIZED: CloseCode.POLICY_VIOLATION,
    ErrorCode.BUSY: CloseCode.TRY_AGAIN_LATER,
    ErrorCode.INTERNAL: CloseCode.INTERNAL_ERROR,
}


def close_code_for(code: ErrorCode) -> CloseCode:
    """The WebSocket close code that ends a session after fatal error ``code``."""
    return _FATAL_CLOSE.get(code, CloseCode.NORMAL)


class CodedError(Exception):
    """An error a client is told about: ``code`` (an :class:`ErrorCode`), a
    human-readable ``message``, and ``fatal`` (whether the session ends; a
    non-fatal error drops only the message or frame that caused it)."""

    def __init__(self, code: ErrorCode | str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.fatal = fatal
