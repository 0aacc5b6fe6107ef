"""Log set-up: text for people, one JSON object per line for log pipelines.

Logs go to stderr only; the driver writes no log file.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        call = getattr(record, "call", None)
        if isinstance(call, dict):
            entry.update(call)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(log_format: str, verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    # Third-party chatter stays quiet unless asked for twice.
    quiet = logging.DEBUG if verbosity > 1 else logging.WARNING
    for name in ("urllib3", "grpc", "pyfuse3"):
        logging.getLogger(name).setLevel(quiet)
    # The Kubernetes client logs whole response bodies at debug level, and a
    # Secret's body is the secret: never below warning, whatever -v says.
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
