"""The live rollout view of `fleet rollout --wait` and `fleet status --watch` (packager.cli.rollout_view)."""

from __future__ import annotations

import io
from typing import Any

from packager.cli.rollout_view import RolloutView, follow, render_waves


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _doc(state: str, waves: list[tuple[int, int, int]]) -> dict[str, Any]:
    rows = [{"index": i, "canary": i == 0, "succeeded": s, "failed": f, "pending": p, "rolled_back": 0}
            for i, (s, f, p) in enumerate(waves)]
    return {"rollout_id": "r-1", "state": state, "reason": "", "current_wave": len(waves) - 1, "waves": rows,
            "succeeded": sum(w[0] for w in waves), "failed": sum(w[1] for w in waves),
            "pending": sum(w[2] for w in waves)}


def test_bars_show_succeeded_failed_and_pending_in_proportion() -> None:
    lines = render_waves(_doc("running", [(1, 0, 0), (5, 5, 10)]))
    assert lines[0] == "rollout r-1: running  succeeded 6  failed 5  pending 10"
    assert "wave 0 canary" in lines[1] and "[" + "#" * 30 + "]" in lines[1]
    assert "[" + "#" * 8 + "!" * 8 + "." * 14 + "]" in lines[2] and "10/20" in lines[2]


def test_a_hundred_waves_show_their_ends_only() -> None:
    lines = render_waves(_doc("running", [(1, 0, 0)] * 100))
    assert len(lines) == 22 and "... 80 more waves ..." in lines[11]


def test_a_terminal_is_redrawn_in_place_and_erased_at_the_end() -> None:
    out = _Terminal()
    docs = iter([_doc("running", [(0, 0, 1), (0, 0, 2)]), _doc("running", [(1, 0, 0), (0, 0, 2)]),
                 _doc("succeeded", [(1, 0, 0), (2, 0, 0)])])
    final = follow(lambda: next(docs), RolloutView(out), lambda d: d["state"] == "succeeded", interval=0)
    assert final["state"] == "succeeded"
    text = out.getvalue()
    assert text.count("\x1b[3F") == 3  # two redraws and the erase, each back over the 3-line block
    assert text.endswith("\x1b[3F\x1b[0J")


def test_a_pipe_gets_one_plain_line_per_change_and_json_gets_nothing() -> None:
    out = io.StringIO()
    view = RolloutView(out)
    for doc in (_doc("running", [(0, 0, 2)]), _doc("running", [(0, 0, 2)]), _doc("succeeded", [(2, 0, 0)])):
        view.update(doc)
    view.close()
    assert out.getvalue().splitlines() == [
        "rollout r-1: running  succeeded 0  failed 0  pending 2  wave 0: 0/2",
        "rollout r-1: succeeded  succeeded 2  failed 0  pending 0  wave 0: 2/2"]
    quiet = _Terminal()
    RolloutView(quiet, quiet=True).update(_doc("running", [(0, 0, 2)]))
    assert quiet.getvalue() == ""
