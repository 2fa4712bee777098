"""bench/structured_output.py: per-token cost of a JSON schema, both schemas, on the default model."""
from __future__ import annotations

from tests.bench_runner import run_bench


def test_table_of_both_schemas():
    proc = run_bench("structured_output.py", "--model", "default", "--rounds", "1", "--max-tokens", "24")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {cells[0]: cells for line in proc.stdout.splitlines()
            if (cells := [c.strip() for c in line.split("|")[1:-1]]) and cells[0] in ("bounded", "unbounded")}
    assert set(rows) == {"bounded", "unbounded"}
    for cells in rows.values():
        assert 0 < int(cells[1]) <= 24 and float(cells[2]) > 0 and float(cells[3]) > 0, cells
    assert "NOT VALID JSON" not in proc.stdout and "load average" in proc.stdout
