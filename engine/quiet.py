"""Library output that says nothing to the user goes to the run's log, not the terminal.

Loading a pretrained backbone with a fresh classification head makes transformers print a "LOAD REPORT" block
("classifier.weight | MISSING ... Consider training on your downstream task") and a "Loading weights" progress bar
on every run, analysis and export. The head is new on purpose, so that report is routine: while a model loads,
``quiet_loading()`` turns progress bars off and sends a report whose every row is a newly initialised head weight to
the logger ``peftlab.library`` at INFO level. ``engine.train`` forwards that logger to the run's log. Every other
warning (unexpected or mismatched keys, missing backbone weights, deprecations) still reaches the terminal.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LIBRARY_LOG = logging.getLogger("peftlab.library")
HEAD_MODULES = {"classifier", "pre_classifier", "score", "head", "heads", "fc"}
_ROW = re.compile(r"^\s*([\w.]+)\s*\|\s*([A-Z_]+)\s*\|", re.MULTILINE)


def routine_load_report(message: str) -> bool:
    """A transformers load report that only lists newly initialised task-head weights (nothing the user must do)."""
    if "LOAD REPORT" not in message:
        return False
    rows = [(key, status) for key, status in _ROW.findall(message) if key != "Key"]
    return bool(rows) and all(s == "MISSING" and key.split(".")[0] in HEAD_MODULES for key, s in rows)


class _RoutineToLog(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if routine_load_report(message):
            LIBRARY_LOG.info(re.sub(r"\x1b\[[0-9;]*m", "", message))  # without the terminal's colour codes
            return False
        return True


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Progress bars off and routine load reports to ``peftlab.library`` while a model loads."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # a backend without transformers (timm only)
        yield
        return
    root = logging.getLogger("transformers")
    handlers = list(root.handlers)
    routine = _RoutineToLog()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    for handler in handlers:
        handler.addFilter(routine)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(routine)
        if bars:
            hf_logging.enable_progress_bar()


class _Forward(logging.Handler):
    def __init__(self, log: Callable[[str], None]):
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log(record.getMessage())


@contextmanager
def library_log_to(log: Callable[[str], None]) -> Iterator[None]:
    """Forward ``peftlab.library`` records to ``log`` (a run's reporter) for the duration."""
    handler = _Forward(log)
    level = LIBRARY_LOG.level
    LIBRARY_LOG.setLevel(logging.INFO)
    LIBRARY_LOG.addHandler(handler)
    try:
        yield
    finally:
        LIBRARY_LOG.removeHandler(handler)
        LIBRARY_LOG.setLevel(level)
