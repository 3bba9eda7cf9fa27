"""Live progress of a rollout for ``fleet rollout --wait`` and ``fleet status --watch``.

On a terminal the view is a block of lines redrawn in place: the rollout's totals, then one line
per wave with a text progress bar (``#`` succeeded, ``!`` failed, ``.`` pending). When stdout is
not a terminal (a pipe, a CI log) it prints one plain line each time the counts change, so logs
stay readable. With ``--json`` it stays silent: the command prints only the final document.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["RolloutView", "follow", "render_waves", "summary_line"]

_BAR_WIDTH = 30
_MAX_WAVE_LINES = 20  # a rollout of 100 waves shows its first and last ones, not a screenful


def summary_line(doc: dict[str, Any]) -> str:
    """``rollout ID: STATE  succeeded N  failed N  pending N  (reason)``."""
    reason = f"  ({doc['reason']})" if doc.get("reason") else ""
    return (f"rollout {doc['rollout_id']}: {doc['state']}  succeeded {doc.get('succeeded', 0)}  "
            f"failed {doc.get('failed', 0)}  pending {doc.get('pending', 0)}{reason}")


def _bar(succeeded: int, failed: int, total: int) -> str:
    if total <= 0:
        return "[" + " " * _BAR_WIDTH + "]"
    ok = round(_BAR_WIDTH * succeeded / total)
    bad = min(_BAR_WIDTH - ok, round(_BAR_WIDTH * failed / total))
    return "[" + "#" * ok + "!" * bad + "." * (_BAR_WIDTH - ok - bad) + "]"


def _wave_line(wave: dict[str, Any]) -> str:
    done, failed, pending = (int(wave.get(k) or 0) for k in ("succeeded", "failed", "pending"))
    total = done + failed + pending + int(wave.get("rolled_back") or 0)
    label = f"wave {wave.get('index', '?')}" + (" canary" if wave.get("canary") else "")
    return (f"  {label:<14} {_bar(done, failed, total)} {done + failed:>6}/{total:<6} "
            f"succeeded {done}  failed {failed}  pending {pending}")


def render_waves(doc: dict[str, Any]) -> list[str]:
    """The lines of the live block: the summary, then a bar per wave (the middle ones elided)."""
    waves = list(doc.get("waves") or [])
    lines = [_wave_line(w) for w in waves]
    if len(lines) > _MAX_WAVE_LINES:
        keep = _MAX_WAVE_LINES // 2
        lines = [*lines[:keep], f"  ... {len(lines) - 2 * keep} more waves ...", *lines[-keep:]]
    return [summary_line(doc), *lines]


class RolloutView:
    """Shows each status document it is given: redrawn on a terminal, a line per change otherwise."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self._stream = stream or sys.stdout
        self._quiet = quiet
        self._tty = self._stream.isatty()
        self._drawn = 0  # lines of the live block on the terminal now
        self._last = ""

    def update(self, doc: dict[str, Any]) -> None:
        """Show ``doc`` (a ``fleet status --json`` document)."""
        if self._quiet:
            return
        if self._tty:
            self._redraw(render_waves(doc))
            return
        waves = doc.get("waves") or []
        current = doc.get("current_wave")
        current = current if isinstance(current, int) else -1
        line = summary_line(doc)
        if 0 <= current < len(waves):
            wave = waves[current]
            line += f"  wave {current}: {int(wave.get('succeeded') or 0) + int(wave.get('failed') or 0)}" \
                    f"/{sum(int(wave.get(k) or 0) for k in ('succeeded', 'failed', 'pending', 'rolled_back'))}"
        if line != self._last:
            self._stream.write(line + "\n")
            self._stream.flush()
            self._last = line

    def _redraw(self, lines: list[str]) -> None:
        out = self._stream
        if self._drawn:
            out.write(f"\x1b[{self._drawn}F")  # back to the first line of the block
        for line in lines:
            out.write("\x1b[2K" + line + "\n")
        for _ in range(self._drawn - len(lines)):  # the block shrank: clear what is left below
            out.write("\x1b[2K\n")
        if self._drawn > len(lines):
            out.write(f"\x1b[{self._drawn - len(lines)}F")
        out.flush()
        self._drawn = len(lines)

    def close(self) -> None:
        """Erase the live block (the command then prints its final status in the usual shape)."""
        if self._tty and self._drawn and not self._quiet:
            self._stream.write(f"\x1b[{self._drawn}F\x1b[0J")
            self._stream.flush()
        self._drawn = 0


def follow(fetch: Callable[[], dict[str, Any]], view: RolloutView, done: Callable[[dict[str, Any]], bool],
           interval: float = 1.0) -> dict[str, Any]:
    """Fetch a rollout's status every ``interval`` seconds, showing each, until ``done(status)``."""
    try:
        while True:
            doc = fetch()
            view.update(doc)
            if done(doc):
                return doc
            time.sleep(interval)
    finally:
        view.close()
