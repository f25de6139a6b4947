"""How long work takes, as people read it: every progress line, ETA and log in ragtune formats
durations here."""

from __future__ import annotations

import math


def format_duration(seconds: float | None) -> str:
    """``95`` -> ``1m35s``; ``4000`` -> ``1h06m``; None, NaN or negative -> ``?``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
