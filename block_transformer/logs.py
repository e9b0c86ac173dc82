"""Logging for the command-line tools: plain messages, quiet libraries, and secrets never printed.

Under ``-v`` the hub client logs requests and responses at debug level; a server that echoes the
request headers would print the user's token. Every record that reaches a handler is redacted first.
"""

from __future__ import annotations

import logging
import os
import re

NOISY_LIBRARIES = ("httpx", "httpx2", "huggingface_hub", "transformers", "urllib3")
_SECRETS = [
    re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(bearer\s+)?[^\s'\",}]+"),
    re.compile(r"(?i)bearer\s+[^\s'\",}]+"),
    re.compile(r"\bhf_[A-Za-z0-9]{8,}\b"),
]
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """``text`` with hub tokens and Authorization values replaced by ``[redacted]``."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        token = os.environ.get(name)
        if token and len(token) >= 8:
            text = text.replace(token, REDACTED)
    text = _SECRETS[0].sub(lambda m: m.group(1) + REDACTED, text)
    for pattern in _SECRETS[1:]:
        text = pattern.sub(REDACTED, text)
    return text


class RedactSecrets(logging.Filter):
    """Rewrites each record's final message with :func:`redact` (arguments are formatted first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def setup_logging(verbose: bool) -> None:
    """INFO (DEBUG with ``-v``) as plain messages; libraries at WARNING unless verbose; secrets redacted."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
    if not verbose:
        for noisy in NOISY_LIBRARIES:
            logging.getLogger(noisy).setLevel(logging.WARNING)
