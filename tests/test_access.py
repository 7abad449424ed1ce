"""Origin and token checks (dsstream.access), as pure functions."""

import pytest

from dsstream.access import origin_allowed, request_token, token_ok


@pytest.mark.parametrize(
    "origin, host, allowed, ok",
    [
        (None, "h:1", (), True),  # not a browser page
        ("http://h:1", "h:1", (), True),  # the server's own (its demo page)
        ("https://H:1", "h:1", (), True),  # behind a TLS proxy; case-insensitive
        ("http://h:2", "h:1", (), False),  # another port is another origin
        ("http://localhost:5173", "h:1", (), True),
        ("http://dev.localhost", "h:1", (), True),
        ("http://127.0.0.2:80", "h:1", (), True),
        ("http://[::1]:8080", "h:1", (), True),
        ("http://127.0.0.1.evil.example", "h:1", (), False),
        ("http://evil.example", "h:1", (), False),
        ("null", "h:1", (), False),
        ("ftp://localhost", "h:1", (), False),
        ("http://app.example", "h:1", ("HTTP://App.Example:80",), True),
        ("https://app.example", "h:1", ("http://app.example",), False),
        ("http://evil.example", "h:1", ("*",), True),
        ("http://[bad", "h:1", (), False),
    ],
)
def test_origin_allowed(origin, host, allowed, ok):
    assert origin_allowed(origin, host, allowed) is ok


def test_the_header_wins_over_the_query_even_when_empty():
    assert request_token("Bearer abc", "/v1/stream?token=zzz") == "abc"
    assert request_token("Bearer ", "/v1/stream?token=abc") == ""
    assert request_token("Basic abc", "/v1/stream?token=abc") == ""
    assert request_token(None, "/v1/stream?token=abc") == "abc"
    assert token_ok(None, None, "/")
    assert token_ok("abc", "bearer abc", "/") and not token_ok("abc", None, "/?token=")
    assert not token_ok("abc", None, "/") and not token_ok("abc", "Bearer abd", "/")
