"""Progress: a live line on a terminal; off a terminal (an Airflow task, a pipe) INFO log
records, never raw stderr lines (Airflow shows those as ERROR)."""

from __future__ import annotations

import io
import logging

from lgt_ops.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_an_info_record(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="lgt_ops.progress"):
        p = Progress("mcq [llm]", 4, stream=stream, interval=0.0)
        p.update(2)
        p.close()
    assert stream.getvalue() == ""
    records = [r for r in caplog.records if r.name == "lgt_ops.progress"]
    assert records and all(r.levelno == logging.INFO for r in records)
    assert "mcq [llm]: [" in records[-1].getMessage() and "2/4" in records[-1].getMessage()


def test_on_a_terminal_progress_redraws_one_line(caplog):
    stream = _Terminal()
    with caplog.at_level(logging.INFO, logger="lgt_ops.progress"):
        p = Progress("cot [vlm]", 2, stream=stream, interval=0.0)
        p.update(1)
        p.close()
    assert "\r\x1b[2Kcot [vlm]:" in stream.getvalue() and stream.getvalue().endswith("\n")
    assert not [r for r in caplog.records if r.name == "lgt_ops.progress"]
