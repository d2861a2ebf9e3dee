"""Progress for long work: a live line on a terminal, a periodic INFO log record elsewhere.

Inside Airflow a task's stderr is shown as ERROR lines, so off a terminal progress goes
through `logging` (logger `lgt_ops.progress`, level INFO): the task log shows it as INFO, and
the CLI routes that logger to stderr (see `lgt_ops.cli.main`).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger(__name__)


def _fmt_secs(s: float) -> str:
    s = int(max(s, 0))
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


class Progress:
    """`update()` is cheap: it redraws at most every `interval` seconds."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        interval: float | None = None,
        enabled: bool = True,
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.fields: dict[str, object] = {}
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.2 if self.tty else 15.0)
        self.enabled = enabled
        self.start = time.monotonic()
        # A terminal gets a line at once; a log gets its first line after one interval.
        self._last = 0.0 if self.tty else self.start

    def update(self, n: int = 1, **fields: object) -> None:
        self.done += n
        self.fields.update(fields)
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._draw(final=False)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.label}:"]
        if self.total:
            pct = 100.0 * self.done / self.total
            width = 24
            filled = int(width * min(self.done, self.total) / self.total)
            parts.append(
                f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {pct:5.1f}%"
            )
            if rate > 0 and self.done < self.total:
                parts.append(f"eta {_fmt_secs((self.total - self.done) / rate)}")
        else:
            parts.append(str(self.done))
        parts.append(f"{rate:,.1f}/s elapsed {_fmt_secs(elapsed)}")
        parts += [f"{k}={v}" for k, v in self.fields.items() if v not in (None, 0, {}, "")]
        return " ".join(parts)

    def _draw(self, *, final: bool) -> None:
        text = self.line()
        if self.tty:
            end = "\n" if final else ""
            self.stream.write(f"\r\x1b[2K{text}{end}")
            self.stream.flush()
        else:
            log.info("%s", text)

    def close(self) -> None:
        if self.enabled:
            self._draw(final=True)
