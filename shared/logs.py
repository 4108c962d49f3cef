"""How Coffer's processes log: one line per event, as text for people or JSON for pipelines.

`--log-format text` (the default) is the classic `time LEVEL logger: message`. `--log-format
json` writes one JSON object per line with `ts` (ISO 8601, UTC), `level`, `logger`, `message`,
a traceback as `exc` when there is one, and what the code passed as structured extras (a job's
fields under `job`: controller/jobs/journal.py), so a log shipper needs no parsing rules.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any, Final

FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Extras a record may carry that the JSON form includes as they are.
STRUCTURED: Final = ("job", "alert")


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in STRUCTURED:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(level: str, form: str = "text") -> None:
    """Log to stderr at `level` (a name: INFO, DEBUG...), as `form` (text or json)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if form == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
