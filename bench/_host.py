"""The host line a CPU benchmark prints under its tables: load average before and after, and the CPUs."""
from __future__ import annotations

import os


def load_line(before: tuple[float, float, float]) -> str:
    """`load average (1, 5, 15 min) before: a b c; after: d e f; CPUs: n`, `after` read now."""
    after = os.getloadavg()
    return (f"load average (1, 5, 15 min) before: {' '.join(f'{x:.2f}' for x in before)}; "
            f"after: {' '.join(f'{x:.2f}' for x in after)}; CPUs: {os.cpu_count()}")
