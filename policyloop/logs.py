"""Log set-up for every ``policyloop`` process: plain text for people, one JSON object per line
for log pipelines (``--log-format json``).

A JSON line carries ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger`` and
``message``, the decision fields a call passed with ``extra=`` (``event_id``, ``model_version``,
``policy``), and ``exception`` (the formatted traceback) when there is one:

>>> record = logging.LogRecord("serving.model_store", logging.ERROR, __file__, 1,
...                            "rejected model %s v%d", ("recsys", 7), None)
>>> record.created, record.msecs = 0.0, 0.0
>>> record.policy, record.model_version = "recsys", 7
>>> print(JsonFormatter().format(record))
{"time": "1970-01-01T00:00:00.000Z", "level": "ERROR", "logger": "serving.model_store", \
"message": "rejected model recsys v7", "model_version": 7, "policy": "recsys"}
"""

from __future__ import annotations

import json
import logging
import sys
import time

FORMATS = ("text", "json")
# The fields decision-related log calls pass with ``extra=``; a JSON line carries those present.
FIELDS = ("event_id", "model_version", "policy")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback is a string field, not lines)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, object] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z", "level": record.levelname,
            "logger": record.name, "message": record.getMessage()}
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["exception"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level`` in ``fmt`` ("text" or "json"), replacing earlier handlers.

    In JSON mode Python warnings go through logging too, so every line on stderr that Python
    writes is one JSON object.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(fmt == "json")
