"""Property-based API fuzzing: ``schemathesis`` generates requests from ``/openapi.json``; none may get a 5xx.

Both valid requests (which run on the engine) and invalid ones (which must be refused with a 4xx)
are generated for every operation; responses must also match the documented status codes,
content types and schemas.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from server_helpers import metric

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Generated valid requests can ask for long answers; under a loaded CI machine (parallel test workers)
# one took longer than schemathesis' 10 s default read timeout. A slow answer is not a server error.
READ_TIMEOUT_S = 120


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_never_get_a_server_error(server, mode):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions"}
    generated = metric(server.url, "scalellm_generation_tokens_total")
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # no parameters to get wrong

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=READ_TIMEOUT_S)

        run()
    if mode is GenerationMode.POSITIVE:  # valid requests really ran on the engine
        assert metric(server.url, "scalellm_generation_tokens_total") > generated
