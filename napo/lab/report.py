"""What every lab task's report shares: mean ± std over seeds, table cells, stage times, a run's last q and margins,
the SFT gate's line."""

from __future__ import annotations

from typing import Any

import numpy as np


def mean_std(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric: {"mean", "std"} over seeds (population std; 0 for one seed)."""
    return {
        k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))} for k in rows[0]
    }


def cell(stat: dict[str, float]) -> str:
    """A table cell: "mean ± std", or the mean alone when the std is 0 (one seed)."""
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat["std"] else f"{stat['mean']:.3f}"


def stage_time(seconds: float) -> str:
    """A stage's wall time, or that it came from the cache (0 s)."""
    return f"{seconds:.0f} s" if seconds else "cached by an earlier run, not counted"


def last_q_and_margins(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged loss, q and reward margins of each negative type (what NaPO adapts on)."""
    last: dict[str, float] = {}
    for entry in log_history:
        last.update(
            {k: v for k, v in entry.items() if k.endswith("/q") or k.endswith("rewards/margins") or k == "loss"}
        )
    return last


def gate_line(gate: dict[str, Any]) -> str:
    """The SFT gate as one line: each metric, its range and a mark, then passed / NOT passed."""
    return (
        "SFT gate (lab v2): "
        + ", ".join(
            f"{name} {c['value']:.3f} in [{c['range'][0]}, {c['range'][1]}] {'✓' if c['pass'] else '✗'}"
            for name, c in gate.items()
            if name != "pass"
        )
        + (" — passed." if gate["pass"] else " — NOT passed.")
    )
