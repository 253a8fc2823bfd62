"""Credentials out of the HTTP clients' logs: hosts keep stderr, and the SDKs log every request's URL.

``OPENAI_BASE_URL=http://user:pass@host/v1`` or ``…?api-key=…`` would otherwise reach the log at INFO
on every model call (``HTTP Request: POST http://user:pass@…``). A filter on the clients' loggers
rewrites such records before any handler sees them.
"""

from __future__ import annotations

import logging
import re

_LOGGER_PREFIXES = ("httpx2", "httpx", "httpcore", "openai", "anthropic")
# the exact loggers the clients log on, created now so a module imported later gets the filtered object
_KNOWN_LOGGERS = (
    "httpx2",
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.http11",
    "openai",
    "openai._base_client",
    "anthropic",
    "anthropic._base_client",
)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#\"'<>]+@")
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;](?P<name>[^=&;\s#?\"'<>]+)=)(?P<value>[^&;\s#\"'<>]*)")
_SECRET_NAME = re.compile(r"key|token|secret|passw|pwd|credential|auth|^sig(nature)?$|-signature$", re.I)
REDACTED = "***"


def redact(text: str) -> str:
    """``text`` with URL userinfo and secret-looking query values replaced by ``***``."""
    if "@" not in text and "=" not in text:  # the common case, cheaply
        return text
    text = _USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)
    return _QUERY_PARAM.sub(_redact_param, text)


def _redact_param(match: re.Match[str]) -> str:
    if _SECRET_NAME.search(match["name"]) and match["value"]:
        return match["lead"] + REDACTED
    return match[0]


class RedactingFilter(logging.Filter):
    """Rewrites a record's message when it carries credentials; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's to report, not ours
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_FILTER = RedactingFilter()


def install_redaction() -> None:
    """Put the filter on every HTTP-client and SDK logger that exists (idempotent; cheap to repeat).

    A logger's filters see only the records made on that very logger, not its children's, so each one
    gets it; providers call this when they are built, after the SDK modules have made their loggers.
    """
    names = set(_KNOWN_LOGGERS)
    names.update(
        name for name in list(logging.Logger.manager.loggerDict) if name.split(".", 1)[0] in _LOGGER_PREFIXES
    )
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
