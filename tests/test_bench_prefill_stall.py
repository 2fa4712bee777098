"""bench/prefill_stall.py: a stream keeps decoding between the chunks of a long prompt; fails clearly without data."""
from __future__ import annotations

import re
from functools import partial

from tests.bench_runner import run_bench

bench = partial(run_bench, "prefill_stall.py")


def test_the_stream_decodes_between_chunks_and_stalls_for_a_whole_prompt():
    proc = bench("--model", "default", "--prompt-tokens", "64", "--chunks", "0,16", "--rounds", "1",
                 "--max-seq-len", "256")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r[0].strip(): [float(x) for x in r[1:]] for r in
            (line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "chunk" not in line)}
    assert rows.keys() == {"whole", "16"}
    assert rows["whole"][2] <= 1  # one prefill call: the stream waits for all of it
    assert rows["16"][2] >= 3  # four chunks: a decode step after each of the first three
    assert len(rows["16"]) == 5 and rows["16"][3] > 0  # the short request's TTFT
    assert re.search(r"prompt (49|5\d|6\d) tokens", proc.stdout) and "load average" in proc.stdout  # > 3 chunks


def test_missing_text_fails_clearly(tmp_path):
    proc = bench("--model", "default", "--rounds", "1", env={"FBSERVE_DATA": str(tmp_path)})
    assert proc.returncode != 0 and "evaluation text not found" in proc.stderr
