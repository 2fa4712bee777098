"""Property-based API fuzzing: schemathesis generates requests from our own /openapi.json, valid ones
(positive mode) and ones that break the schema (negative mode), against the app with the fake engine;
no response may be a 5xx."""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from server.admission import ServingConfig  # noqa: E402
from server.app import create_app  # noqa: E402
from server.metrics import Metrics  # noqa: E402

EXAMPLES = 70  # per operation and mode; the 4 POST operations x 2 modes give 560 requests
KEY = "fuzz-key"


def test_no_server_errors_on_generated_requests(fake_engine):
    app = create_app(fake_engine, metrics=Metrics(), config=ServingConfig(api_keys=[KEY], max_queue=1000))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7, [op.label for op in operations]
    sent: dict[str, int] = {}
    failures: list[str] = []

    for operation, mode in [(op, mode) for op in operations for mode in GenerationMode]:
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            sent[operation.label] = sent.get(operation.label, 0) + 1
            response = case.call(headers={"Authorization": f"Bearer {KEY}"})
            try:
                case.validate_response(response, checks=[not_a_server_error])
            except AssertionError as exc:  # keep going: report every failing operation at once
                failures.append(f"{operation.label}: {response.status_code} {response.text[:300]}\n{exc}")

        try:
            run()
        except Unsatisfiable:  # negative mode on an operation without parameters: nothing to break
            assert mode is GenerationMode.NEGATIVE, operation.label
    assert not failures, "\n\n".join(failures[:5])
    assert sum(sent.values()) >= 500, sent
