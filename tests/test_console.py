"""`ray_sft.console`: the live progress bar on a real pseudo-terminal, plain lines everywhere else."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import termios

from ray_sft import console

STEPS = [f"[ray-sft] step {n}/5 | loss {2 - n / 10:.4f} | 1234 tok/s | ETA {5 - n}s" for n in range(1, 6)]


def _drain(fd: int) -> str:
    chunks = []
    while select.select([fd], [], [], 0.5)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def test_step_lines_become_one_live_bar_on_a_terminal():
    main, replica = pty.openpty()
    fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    with os.fdopen(replica, "w", buffering=1, encoding="utf-8") as terminal:
        assert terminal.isatty()
        progress = console.Progress(terminal)
        progress.line("[ray-sft] data: 40 rows")
        for line in STEPS:
            progress.line(line)
        progress.line("[ray-sft] adapter: runs/x/adapter")
        progress.close()
        shown = _drain(main)
    os.close(main)
    assert "5/5 [" in shown and "loss 1.5000" in shown  # tqdm's count and the latest loss
    assert "step 3/5" not in shown  # the step lines themselves became the bar
    assert "[ray-sft] data: 40 rows" in shown and "[ray-sft] adapter: runs/x/adapter" in shown


def test_step_lines_stay_plain_lines_off_a_terminal(tmp_path):
    with open(tmp_path / "console.txt", "w", encoding="utf-8") as stream:
        progress = console.Progress(stream)
        for line in ["[ray-sft] data: 40 rows", *STEPS, "[ray-sft] adapter: runs/x/adapter"]:
            progress.line(line)
        progress.close()
    assert (tmp_path / "console.txt").read_text().splitlines() == [
        "[ray-sft] data: 40 rows", *STEPS, "[ray-sft] adapter: runs/x/adapter"]
