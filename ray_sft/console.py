"""What the console shows: ray_sft's own lines; everything else (libraries, Ray, its workers) goes to <run>/logs/.

A run's console is read by people (and CI logs), so by default it carries only ray_sft's phases, progress and
errors. The driver's file descriptors 1 and 2 point at <run>/logs/console.log for the duration of `quiet`, which
catches every library's prints, bars, warnings and log handlers (many hold their stream from import time, so
reconfiguring them one by one would miss some). ray_sft's lines go to the saved terminal through `show`. Lines
that ray_sft prints inside Ray actors and workers (Ray Train's progress) reach the driver through Ray's log stream;
those that start with OWN_PREFIX are echoed to the terminal, and all of them still land in the log file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from pathlib import Path

OWN_PREFIX = "[ray-sft"
LOG_DIR = "logs"
# run_files.progress_line's format: "[ray-sft] step 3/47 | loss 1.2345 | ... | ETA 12s"
STEP_LINE = re.compile(r"^\[ray-sft\] step (\d+)/(\d+) \| (.*?)(?: \| ETA [^|]*)?$")

_terminal = None  # the console while `quiet` holds the real stdout; None: sys.stdout is the console
_progress = None  # the console's Progress while `quiet` holds it


def show(line: str) -> None:
    """One ray_sft line on the console (inside a Ray worker: on its stdout, which the driver echoes)."""
    if _progress is not None:
        _progress.line(line)
    else:
        print(line, file=_terminal or sys.stdout, flush=True)


class Progress:
    """ray_sft's lines on `stream`: on a terminal the step lines of a run become one live bar (tqdm: steps, rate,
    ETA, the latest loss) with every other line printed above it; elsewhere (CI, Ray job logs, a file) each line
    is printed as it comes, so logs stay plain text."""

    def __init__(self, stream):
        self.stream, self.bar = stream, None
        self.live = stream.isatty()

    def line(self, text: str) -> None:
        step = STEP_LINE.match(text) if self.live else None
        if step is None:
            if self.bar is not None:
                self.bar.write(text, file=self.stream)  # above the bar, which is redrawn below
            else:
                print(text, file=self.stream, flush=True)
            return
        done, total, latest = int(step[1]), int(step[2]), step[3]
        if self.bar is None or self.bar.total != total or done < self.bar.n:  # a new run (or a resumed one)
            self.close()
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=self.stream, unit="step", dynamic_ncols=True, desc="[ray-sft] training")
        self.bar.set_postfix_str(latest, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def say(line: str, file=None) -> None:
    """A phase line: `[ray-sft] ...`."""
    if file is None:
        show(f"{OWN_PREFIX}] {line}")
    else:
        print(f"{OWN_PREFIX}] {line}", file=file, flush=True)


@contextlib.contextmanager
def quiet(run_dir: Path, verbose: bool = False):
    """Library and Ray output to <run_dir>/logs/console.log, ray_sft's own lines to the console; verbose: as is."""
    global _terminal, _progress

    if verbose or _terminal is not None:
        yield
        return
    log_dir = Path(run_dir) / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    say(f"library and Ray output: {log_dir / 'console.log'} (-v shows it here)")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    _terminal, owned = _console_stream()
    _progress = Progress(_terminal)
    streams = sys.stdout, sys.stderr
    with open(log_dir / "console.log", "a", encoding="utf-8", buffering=1) as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        # Python-level writers too (Ray's echo of worker output, warnings): sys.stdout is not always fd 1 (a
        # notebook, a captured stdout), and they look it up at each write.
        sys.stdout = sys.stderr = log_file
        handler = _own_warnings_to_terminal()
        echo = _echo_own_worker_lines()
        try:
            yield
        finally:
            echo()
            _progress.close()
            _progress = None
            logging.getLogger("ray_sft").removeHandler(handler)
            log_file.flush()
            sys.stdout, sys.stderr = streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if owned:
                _terminal.close()
            _terminal = None


def _console_stream():
    """(stream, owned): a duplicate of fd 1 when sys.stdout writes there (fd 1 is about to point at the log file);
    else sys.stdout itself, which already writes elsewhere (a capture, such as pytest's capsys)."""
    try:
        if sys.stdout.fileno() == 1:
            return os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8"), True
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both an OSError and a ValueError
        pass
    return sys.stdout, False


def _own_warnings_to_terminal() -> logging.Handler:
    """ray_sft's own warnings still reach the console (they say something a person should act on)."""
    handler = _Shown()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"{OWN_PREFIX}] warning: %(message)s"))
    logging.getLogger("ray_sft").addHandler(handler)
    return handler


class _Shown(logging.Handler):
    """Log records as console lines (through `show`, so a live progress bar stays below them)."""

    def emit(self, record: logging.LogRecord) -> None:
        show(self.format(record))


def _echo_own_worker_lines():
    """Echo ray_sft's lines from Ray workers and actors; returns the undo. Ray's driver hands every batch of worker
    output to the handlers of this dispatcher (its own handler writes them to stdout, now the log file). It is
    not public API: without it, worker lines stay in the log file only."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return lambda: None

    def echo(batch: dict) -> None:
        for line in batch.get("lines", ()):
            if line.startswith(OWN_PREFIX):
                show(line)  # step lines feed the live bar on a terminal

    dispatcher.add_handler("ray_sft_echo", echo)
    return lambda: dispatcher.remove_handler("ray_sft_echo")
