"""schemathesis against a live server process: every operation of docs/openapi.json, with valid and invalid data.

The server is `python run.py` on a real port over a real SQLite file, seeded with two users in a dialog and a
third in none, and called with a real bearer token. schemathesis runs its examples, coverage (boundaries, missing
and wrongly typed fields, methods the document does not list) and fuzzing phases, positive and negative, with
a fixed seed and a bounded number of examples; its checks fail a test on a 500, a status or a header the document
does not declare, an answer that violates the declared schema, invalid data accepted, or an undeclared method
answered other than 405 with `Allow`. The server must still serve afterwards, must have logged no traceback, and
must exit 0 on SIGTERM.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import requests
import schemathesis

from handlers.app import OPENAPI_DOCUMENT
from tests.conftest import Live
from tests.process import ALICE_PHONE

# Per operation and phase: enough to reach every branch of the bodies and parameters, few enough for CI (the whole
# run takes well under a minute on 2 cores).
MAX_EXAMPLES = 12
SEED = 20251105
ACCESS_LINE = re.compile(r" ([1-5][0-9]{2}) (?:GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS|TRACE|QUERY) /")


@pytest.fixture
def api(live: Live) -> Any:
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "base-url": live.url,
            "request-timeout": 10,
            # /api/events never ends: its first event (ready) is read and checked, then the stream is closed.
            "max-stream-events": 1,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
            "phases": {"stateful": {"enabled": False}},
            "auth": {"openapi": {"bearerAuth": {"bearer": live.token}}},
            # The seeded dialog and message, so that bodies and queries reach past the membership checks.
            "parameters": {"path.dialogId": live.dialog_id, "path.messageId": live.message_id},
            "operations": [
                # 101 Switching Protocols is the upgrade's success, not an error; 426 is RFC 6455's refusal of a
                # version the server does not speak.
                {"include-path": "/ws", "checks": {
                    "not_a_server_error": {"expected-statuses": ["101", "2xx", "4xx"]},
                    "negative_data_rejection": {"expected-statuses": ["400", "401", "403", "404", "405", "426"]}}},
                # Values that the schema allows but that this database or server does not hold are refused with 400 by
                # the contract (a member, a `before`/`after` that is not there, a cursor it never issued; a member
                # removed by someone who is not the dialog's creator is 403); and
                # `/api/users` needs exactly one of its two parameters, which a schema of independent parameters
                # cannot say.
                *(
                    {"include-operation-id": operation, "checks": {"positive_data_acceptance": {
                        "expected-statuses": ["2xx", "101", "400", "401", "403", "404"]}}}
                    for operation in ("createDialog", "updateDialog", "listMessages", "findUsers", "markRead", "poll",
                                      "acknowledge", "eventStream", "webSocket")
                ),
            ],
        }
    )
    return schemathesis.openapi.from_path(OPENAPI_DOCUMENT, config=config)


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
def test_every_operation_answers_as_documented(case: schemathesis.Case) -> None:
    case.call_and_validate()


def test_the_server_still_serves_logged_no_traceback_and_stops_cleanly(live: Live) -> None:
    response = requests.get(live.url + "/healthz", timeout=5)
    assert response.status_code == 200
    assert live.call("GET", "/api/me")["phone"] == ALICE_PHONE
    assert live.server.terminate() == 0
    stderr = live.server.process.stderr
    assert "Traceback" not in stderr and " ERROR " not in stderr, stderr[-5000:]
    # The access log shows the fuzzing happened (hundreds of answers), and not one answer was a 5xx.
    statuses = [int(found.group(1)) for found in map(ACCESS_LINE.search, live.server.process.lines) if found]
    assert len(statuses) >= 500, len(statuses)
    assert max(statuses) < 500

