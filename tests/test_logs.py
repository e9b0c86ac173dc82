"""Secrets never reach the tools' logs, at any verbosity."""

from __future__ import annotations

import io
import logging

from block_transformer.logs import RedactSecrets, redact

TOKEN = "hf_abcdefghijklmnopqrstuvwxyz012345"


def test_tokens_and_authorization_values_are_redacted(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "my-private-token-123")
    text = redact(
        f"headers={{'authorization': 'Bearer {TOKEN}'}} echo: my-private-token-123 Authorization: Bearer abc.def"
    )
    assert TOKEN not in text and "my-private-token-123" not in text and "abc.def" not in text
    assert text.count("[redacted]") >= 3


def test_a_debug_record_that_echoes_the_token_is_redacted_by_the_handler(monkeypatch):
    """Regression: under -v, a hub response header echoing the token was printed."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets())
    logger = logging.getLogger("huggingface_hub.test_echo")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug("response headers: %s", {"x-echo-authorization": f"Bearer {TOKEN}", "x-token": TOKEN})
    finally:
        logger.removeHandler(handler)
    assert TOKEN not in stream.getvalue() and "[redacted]" in stream.getvalue()
