"""bench/chat_turns.py: runs a short chat end to end on the default model and fails clearly without data."""
from __future__ import annotations

from functools import partial

from tests.bench_runner import run_bench

bench = partial(run_bench, "chat_turns.py")


def test_two_turns_reuse_the_first_and_report_both_engines():
    proc = bench("--turns", "2", "--max-tokens", "4", "--doc-tokens", "120", "--max-seq-len", "512")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "turn" not in line]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(1, 1), (2, 1)]
    prompt2, reused2 = int(rows[1][2]), int(rows[1][3])
    assert int(rows[0][3]) == 0 and prompt2 // 2 < reused2 < prompt2  # turn 2 reuses the first turn's tokens
    assert "2 concurrent requests" in proc.stdout and "tokens reused" in proc.stdout


def test_missing_text_fails_clearly(tmp_path):
    proc = bench("--turns", "1", env={"FBSERVE_DATA": str(tmp_path)})
    assert proc.returncode != 0 and "evaluation text not found" in proc.stderr
