"""`GET /api/users` (extension) over real HTTP: names of the people a user shares a dialog with, and a lookup by
exact phone. Nobody learns that an id exists unless they share a dialog with its user."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from chatserver.models import new_id
from tests.conftest import ALICE_PHONE, BOB_PHONE, CAROL_PHONE, Client
from tests.test_rest import assert_error, assert_ok

USER_KEYS = {"userId", "name", "phone"}


async def users(client: Client, query: str, **kwargs: Any) -> list[dict[str, Any]]:
    data = assert_ok(*await client.call("GET", f"/api/users?{query}", **kwargs))
    assert isinstance(data, list) and all(set(user) == USER_KEYS for user in data), data
    return list(data)


@pytest.mark.gen_test
async def test_users_by_id_are_those_sharing_a_dialog_with_the_caller(
    alice: Client, bob: Client, carol: Client
) -> None:
    everyone = f"ids={alice.user_id},{bob.user_id},{carol.user_id}"
    assert await users(alice, everyone) == [
        {"userId": alice.user_id, "name": "Alice", "phone": ALICE_PHONE},
        {"userId": bob.user_id, "name": "Bob", "phone": BOB_PHONE},
    ]
    # Carol shares no dialog with anyone yet: she sees herself only, and nobody sees her.
    assert await users(carol, everyone) == [{"userId": carol.user_id, "name": "Carol", "phone": CAROL_PHONE}]
    assert await users(bob, f"ids={carol.user_id}") == []

    status, body = await carol.call("POST", "/api/dialogs", {"title": "Carol and Alice", "memberIds": [alice.user_id]})
    assert_ok(status, body, 201)
    assert [u["userId"] for u in await users(carol, everyone)] == [alice.user_id, carol.user_id]
    assert [u["userId"] for u in await users(alice, everyone)] == [alice.user_id, bob.user_id, carol.user_id]
    assert await users(bob, f"ids={carol.user_id}") == []  # still no dialog with Bob


@pytest.mark.gen_test
async def test_unknown_ids_are_left_out_and_repeats_answered_once(alice: Client, bob: Client) -> None:
    ghost = new_id("usr")
    assert [u["userId"] for u in await users(alice, f"ids={ghost},{bob.user_id},{bob.user_id}")] == [bob.user_id]
    assert await users(alice, f"ids={ghost}") == []


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "query",
    [
        "ids=",
        "ids=dlg_1",
        "ids=usr_1,,usr_2",
        "ids=usr_1,",
        "ids=hello",
        "",
        "phone=",
        f"ids=usr_1&phone={ALICE_PHONE}",
    ],
)
async def test_a_malformed_query_is_400(alice: Client, query: str) -> None:
    assert_error(*await alice.call("GET", f"/api/users?{query}"), 400)


@pytest.mark.gen_test
async def test_at_most_200_ids(alice: Client, bob: Client) -> None:
    filler = [new_id("usr") for _ in range(199)]
    assert [u["userId"] for u in await users(alice, "ids=" + ",".join([bob.user_id, *filler]))] == [bob.user_id]
    assert_error(
        *await alice.call("GET", "/api/users?ids=" + ",".join([bob.user_id, *filler, new_id("usr")])), 400, "200"
    )


@pytest.mark.gen_test
async def test_lookup_by_exact_phone(alice: Client, carol: Client) -> None:
    # Found whether or not a dialog is shared: that is how a first dialog starts.
    assert await users(alice, f"phone={CAROL_PHONE}") == [
        {"userId": carol.user_id, "name": "Carol", "phone": CAROL_PHONE}
    ]
    assert await users(alice, "phone=70000000009") == []
    assert await users(alice, f"phone={CAROL_PHONE[:-1]}") == []  # exact match only, never a prefix search
    assert await users(alice, f"phone={quote(CAROL_PHONE + '%')}") == []


@pytest.mark.gen_test
async def test_users_need_a_token(alice: Client, bob: Client) -> None:
    assert_error(*await alice.call("GET", f"/api/users?ids={bob.user_id}", token=""), 401)
    assert_error(*await alice.call("GET", f"/api/users?phone={BOB_PHONE}", token="not-a-token"), 401)
