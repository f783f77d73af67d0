"""The service's logging: its own loggers beside uvicorn's, and session ids kept out of every log line.

A session id is the only credential a session has, and the access log would print one in every
session route's path (`GET /sessions/<id>/export`). A filter on uvicorn's access logger replaces each
id with its first characters, enough to tell sessions apart in a log and far too few to use one.
"""

from __future__ import annotations

import logging
import re

SHOWN_CHARS = 4  # of a 32-character id: 24 bits, to tell lines apart, not to guess the other 168
_SESSION_PATH = re.compile(r"(/sessions/)([A-Za-z0-9_-]+)")


def redact_session_ids(text: str) -> str:
    """/sessions/<id>... -> /sessions/<first chars>…; /sessions/import and the like are not ids."""
    return _SESSION_PATH.sub(lambda m: m.group(0) if m.group(2) == "import" else
                             f"{m.group(1)}{m.group(2)[:SHOWN_CHARS]}…", text)


class RedactSessionIds(logging.Filter):
    """Rewrites uvicorn's access records, whose path is one of the format's arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_session_ids(a) if isinstance(a, str) else a for a in record.args)
        record.msg = redact_session_ids(record.msg) if isinstance(record.msg, str) else record.msg
        return True


def configure(level: str) -> None:
    """The service's own loggers print at the configured level beside uvicorn's (which configures only
    its own); the access log loses its session ids."""
    logger = logging.getLogger("charlstm")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactSessionIds) for f in access.filters):
        access.addFilter(RedactSessionIds())
