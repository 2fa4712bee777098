"""bench/kv_cache.py: memory, step times and teacher-forced quality per KV cache dtype, on the default model."""
from __future__ import annotations

from functools import partial

from tests.bench_runner import run_bench

bench = partial(run_bench, "kv_cache.py")


def test_tables_for_each_dtype():
    proc = bench("--model", "default", "--lengths", "32,96", "--steps", "2", "--rounds", "1", "--windows", "1",
                 "--prefill", "40", "--teacher", "6", "--max-batch", "2", "--max-seq-len", "256")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if cells and cells[0] in ("float32", "float16", "bfloat16"):
            rows.setdefault(cells[0], []).append(cells)
    assert set(rows) == {"float32", "float16", "bfloat16"}
    memory = {name: float(r[0][1].split()[0]) for name, r in rows.items()}
    assert memory["float16"] == memory["bfloat16"] == memory["float32"] / 2  # 2 x 256 tokens x 30 layers
    for name, (speed, quality) in rows.items():
        assert all(float(ms) > 0 for ms in speed[2:4]), speed
        assert 1 < float(quality[1]) < 1e4 and quality[5].endswith("/6"), quality
    assert float(rows["float32"][1][4]) == 0 < float(rows["float16"][1][4])  # logit change: none to itself


def test_missing_text_fails_clearly(tmp_path):
    proc = bench("--model", "default", env={"FBSERVE_DATA": str(tmp_path)})
    assert proc.returncode != 0 and "evaluation text not found" in proc.stderr
