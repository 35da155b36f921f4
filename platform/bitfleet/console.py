"""The driver's console: logging with -q/-v, each run's progress, the end-of-run table.

On a terminal, progress is a live display — rich's Progress, one bar per run over the epoch's steps with
loss, lr, images/s, data wait and the ETAs beside it — and log lines print above it. Rich, rather than
tqdm, because one library then gives the live bars, the log lines that interleave with them and the
end-of-run table, each rendered as plain text where there is no terminal. In a log (a file, a pipe, a
Ray Job's output) every progress event is one plain line. Worker output is not forwarded by Ray unless
-v (the workers send what matters through their driver: engine/events.py), so each line appears once.
"""
from __future__ import annotations

import io
import logging
import os
import sys
import threading
import warnings

from rich.console import Console
from rich.highlighter import NullHighlighter
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Column, Table

from bitfleet import progress
from bitfleet.errors import SpecWarning, one_line

log = logging.getLogger("bitfleet")
QUIET, NORMAL, VERBOSE = -1, 0, 1
_state = {"verbosity": NORMAL, "live": False}
_console = Console()
# on a narrow terminal the stats give way (cut short at the right), never the bar or where the run is
_where = Column(no_wrap=True)  # `[run] epoch 3/120 step 500/5005`: its min_width grows to the longest shown
_bars = Progress(TextColumn("{task.description}", table_column=_where),
                 BarColumn(bar_width=20, table_column=Column(no_wrap=True, min_width=20)),
                 TextColumn("{task.fields[stats]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                 console=_console, transient=True)
_tasks: dict[str, int] = {}
_lock = threading.Lock()


def setup(verbosity: int = NORMAL) -> None:
    """Logging of the driver: warnings and errors only (-q), progress and events (default), and Ray's own
    output and debug lines (-v). Live bars when stdout is a terminal (BITFLEET_PROGRESS=plain turns
    them off)."""
    _state["verbosity"] = verbosity
    _state["live"] = _console.is_terminal and verbosity >= NORMAL and os.environ.get("BITFLEET_PROGRESS") != "plain"
    level = {QUIET: logging.WARNING, NORMAL: logging.INFO}.get(verbosity, logging.DEBUG)
    handlers: list[logging.Handler]
    if _state["live"]:
        live = RichHandler(console=_console, show_time=False, show_path=False, show_level=False, markup=False,
                           highlighter=NullHighlighter())
        live.setFormatter(_Labelled())
        handlers = [live]
    else:
        out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
        out.addFilter(lambda record: record.levelno < logging.WARNING)
        err.setLevel(logging.WARNING)
        err.setFormatter(_Labelled("bitfleet: "))
        handlers = [out, err]
    for name in ("bitfleet", "workloads"):
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)


class _Labelled(logging.Formatter):
    """Info lines as they are; a warning or an error says so (`bitfleet: warning: ...` in a log)."""

    def __init__(self, prefix: str = ""):
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{self.prefix}{record.levelname.lower()}: {message}"


def verbosity() -> int:
    return _state["verbosity"]


def verbose() -> bool:
    return _state["verbosity"] >= VERBOSE


def show_progress(event: dict) -> None:
    """A `progress` event: the run's bar moves (a terminal) or one line is logged."""
    if not _state["live"]:
        log.info(progress.progress_line(event))
        return
    stats = (f"ETA {progress.duration(event['eta_epoch_s'])} / run {progress.duration(event['eta_run_s'])}  "
             f"loss {event['loss']:.4g}  lr {event['lr']:.3g}  {event['images_per_s']:.0f} img/s  "
             f"data {100 * event['data_wait']:.0f}%")
    where = f"[{event['run']}] epoch {event['epoch']}/{event['epochs']} step {event['step']}/{event['steps']}"
    description = escape(where)
    with _lock:
        _where.min_width = max(_where.min_width or 0, len(where))
        if not _tasks:
            _bars.start()
        if event["run"] not in _tasks:
            _tasks[event["run"]] = _bars.add_task(description, total=event["steps"], stats=stats)
        _bars.update(_tasks[event["run"]], description=description, completed=event["step"],
                     total=event["steps"], stats=stats)
        _bars.refresh()  # drawn now, not at the next tick: an epoch can end before it


def end_progress(run: str) -> None:
    """The run's bar goes (its epoch ended, or the run did)."""
    with _lock:
        task = _tasks.pop(run, None)
        if task is not None:
            _bars.remove_task(task)
        if not _tasks and _state["live"]:
            _bars.stop()


def print_table(table: Table) -> None:
    """A table on the console; in a log, as plain text at INFO (hidden by -q... except the summary)."""
    if _state["live"]:
        _console.print(table)
        return
    text = io.StringIO()
    Console(file=text, width=110, color_system=None, legacy_windows=False).print(table)
    print(text.getvalue().rstrip(), flush=True)


def summary_table(run: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=f"{run}: summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for what, value in rows:
        table.add_row(what, value)
    return table


def spec_warnings_on_one_line() -> None:
    """A SpecWarning as one line of the driver's log (`bitfleet: warning: <field>: ...`, after -q/-v like every
    warning); other warnings as Python shows them."""
    show = warnings.showwarning
    if getattr(show, "bitfleet", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SpecWarning):
            log.warning(one_line(str(message)))
        else:
            show(message, category, filename, lineno, file, line)

    showwarning.bitfleet = True
    warnings.showwarning = showwarning
