"""The evaluation and calibration data the tests and benchmarks read must be there, intact."""
from __future__ import annotations

import hashlib

from quant.eval import data_dir


def test_shared_data_is_present_and_matches_its_checksums():
    root = data_dir()
    sums = root / "SHA256SUMS"
    assert sums.is_file(), (f"evaluation data missing: {sums} not found. Put the shared data sets in "
                            f"{root} or point FBSERVE_DATA at the folder that holds them.")
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        path = root / name.lstrip("*")
        assert path.is_file(), f"evaluation data missing: {path}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"evaluation data damaged: {path}"
