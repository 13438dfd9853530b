"""PROTOCOL section 2 over real HTTP: every endpoint's success and each of its error statuses.

Every error answer is checked for the envelope `{"success": false, "error": str}`, and no request here, however
bad, may get a 500.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import tornado.httpclient

from chatserver import jsonutil, queries
from chatserver.auth import TokenSigner, load_or_create_secret
from chatserver.models import Message, new_id, now_iso
from handlers.base import AppContext
from tests.conftest import ALICE_PHONE, PASSWORD, Client

EMOJI = "\U0001f600"


def assert_error(status: int, body: Any, expected: int, *mentions: str) -> str:
    """The answer is `expected` with exactly the error envelope, naming what is wrong."""
    assert status == expected, (status, body)
    assert isinstance(body, dict) and set(body) == {"success", "error"}, body
    assert body["success"] is False
    assert isinstance(body["error"], str) and body["error"].strip(), body
    for word in mentions:
        assert word in body["error"], (word, body["error"])
    return str(body["error"])


def assert_ok(status: int, body: Any, expected: int = 200) -> Any:
    assert status == expected, (status, body)
    assert isinstance(body, dict) and set(body) == {"success", "data"} and body["success"] is True, body
    return body["data"]


USER_KEYS = {"userId", "name", "phone"}
DIALOG_KEYS = {"dialogId", "title", "memberIds", "createdAt", "updatedAt", "createdBy", "lastMessage", "unreadCount"}
MESSAGE_KEYS = {
    "messageId",
    "dialogId",
    "senderId",
    "content",
    "type",
    "meta",
    "createdAt",
    "updatedAt",
    "clientMessageId",
}


def dialog_paths(dialog_id: str, message_id: str) -> list[tuple[str, str, Any]]:
    """Every endpoint under one dialog, with a body that would be valid for a member."""
    return [
        ("GET", f"/api/dialogs/{dialog_id}", None),
        ("GET", f"/api/messages/dialog/{dialog_id}", None),
        ("POST", f"/api/messages/dialog/{dialog_id}", {"content": "hi"}),
        ("POST", f"/api/dialogs/{dialog_id}/typing", {"typing": True}),
        ("POST", f"/api/dialogs/{dialog_id}/read", {"messageId": message_id}),
        ("PATCH", f"/api/messages/{message_id}", {"content": "edited"}),
    ]


# -- login and /api/me ------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_login_returns_a_token_that_authenticates_the_user(alice: Client) -> None:
    status, body = await alice.call("POST", "/api/auth/login", {"phone": ALICE_PHONE, "password": PASSWORD}, token="")
    data = assert_ok(status, body)
    assert set(data) == {"token", "user"}
    assert data["user"] == {"userId": alice.user_id, "name": "Alice", "phone": ALICE_PHONE}
    status, body = await alice.call("GET", "/api/me", token=data["token"])
    assert assert_ok(status, body) == data["user"]


@pytest.mark.gen_test
async def test_login_with_wrong_password_or_unknown_phone_is_401_and_says_the_same(alice: Client) -> None:
    wrong = await alice.call("POST", "/api/auth/login", {"phone": ALICE_PHONE, "password": "nope"}, token="")
    unknown = await alice.call("POST", "/api/auth/login", {"phone": "70000000001", "password": PASSWORD}, token="")
    empty = await alice.call("POST", "/api/auth/login", {"phone": ALICE_PHONE, "password": ""}, token="")
    assert assert_error(*wrong, 401) == assert_error(*unknown, 401) == assert_error(*empty, 401)


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"phone": 79111111111, "password": PASSWORD}, "phone"),
        ({"phone": ALICE_PHONE, "password": 1234}, "password"),
        ({"phone": ALICE_PHONE, "password": None}, "password"),
        ({"password": PASSWORD}, "phone"),
        ({"phone": ALICE_PHONE}, "password"),
        ({"phone": [ALICE_PHONE], "password": PASSWORD}, "phone"),
        ({"phone": "", "password": PASSWORD}, "phone"),
    ],
)
async def test_login_with_wrong_types_is_400_naming_the_field(alice: Client, body: Any, field: str) -> None:
    assert_error(*await alice.call("POST", "/api/auth/login", body, token=""), 400, field)


@pytest.mark.gen_test
async def test_login_with_a_body_that_is_not_an_object_is_400(alice: Client) -> None:
    for raw in (b"", b"[]", b'"79111111111"', b"{", b"null"):
        assert_error(*await alice.call("POST", "/api/auth/login", raw=raw, token=""), 400)


@pytest.mark.gen_test
async def test_reads_do_not_wait_behind_password_hashing(alice: Client, ctx: AppContext, dialog_id: str) -> None:
    # Every hashing thread busy (as under a burst of logins): history and /api/me still answer.
    gate = threading.Event()
    busy = [asyncio.ensure_future(ctx.service.store.offload(gate.wait, 10)) for _ in range(4)]
    try:
        assert assert_ok(*await asyncio.wait_for(alice.call("GET", f"/api/messages/dialog/{dialog_id}"), 5)) == []
        assert assert_ok(*await asyncio.wait_for(alice.call("GET", "/api/me"), 5))["userId"] == alice.user_id
    finally:
        gate.set()
        await asyncio.wait_for(asyncio.gather(*busy), 10)


@pytest.mark.gen_test
async def test_me_returns_the_caller(bob: Client) -> None:
    data = assert_ok(*await bob.call("GET", "/api/me"))
    assert data == {"userId": bob.user_id, "name": "Bob", "phone": "79777777777"}


# -- dialogs ------------------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_dialog_list_is_most_recently_active_first_with_last_message_and_unread(
    alice: Client, bob: Client, dialog_id: str
) -> None:
    other = assert_ok(*await alice.call("POST", "/api/dialogs", {"title": "Other", "memberIds": [bob.user_id]}), 201)
    first = await alice.post_message(dialog_id, "one")
    second = await alice.post_message(other["dialogId"], "two")
    dialogs = assert_ok(*await bob.call("GET", "/api/dialogs"))
    assert [d["dialogId"] for d in dialogs] == [other["dialogId"], dialog_id]
    assert all(set(d) == DIALOG_KEYS for d in dialogs)
    assert dialogs[0]["lastMessage"] == second and dialogs[1]["lastMessage"] == first
    assert [d["unreadCount"] for d in dialogs] == [1, 1]

    third = await bob.post_message(dialog_id, "three")
    await alice.post_message(dialog_id, "four")
    dialogs = assert_ok(*await bob.call("GET", "/api/dialogs"))
    assert [d["dialogId"] for d in dialogs] == [dialog_id, other["dialogId"]]
    assert dialogs[0]["lastMessage"]["content"] == "four"
    assert [d["unreadCount"] for d in dialogs] == [2, 1]  # bob's own "three" is not unread for him
    mine = assert_ok(*await alice.call("GET", "/api/dialogs"))
    assert [d["unreadCount"] for d in mine] == [1, 0]
    assert third["senderId"] == bob.user_id


@pytest.mark.gen_test
async def test_dialog_list_of_a_user_in_no_dialog_is_empty(carol: Client) -> None:
    assert assert_ok(*await carol.call("GET", "/api/dialogs")) == []


@pytest.mark.gen_test
async def test_created_dialog_always_has_the_caller_as_member(alice: Client, bob: Client, carol: Client) -> None:
    data = assert_ok(*await carol.call("POST", "/api/dialogs", {"title": "Trio", "memberIds": [alice.user_id]}), 201)
    assert set(data) == DIALOG_KEYS
    assert data["memberIds"] == [carol.user_id, alice.user_id]
    assert data["lastMessage"] is None and data["unreadCount"] == 0 and data["title"] == "Trio"
    assert data["createdAt"] == data["updatedAt"] and data["dialogId"].startswith("dlg_")
    alone = assert_ok(*await carol.call("POST", "/api/dialogs", {"title": "Notes"}), 201)
    assert alone["memberIds"] == [carol.user_id]
    itself = assert_ok(
        *await carol.call("POST", "/api/dialogs", {"title": "Me", "memberIds": [carol.user_id, carol.user_id]}), 201
    )
    assert itself["memberIds"] == [carol.user_id]
    # Alice sees the new dialog at once; Bob, not a member, does not see it and may not open it.
    assert data["dialogId"] in [d["dialogId"] for d in assert_ok(*await alice.call("GET", "/api/dialogs"))]
    assert_error(*await bob.call("GET", f"/api/dialogs/{data['dialogId']}"), 403)


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"memberIds": []}, "title"),
        ({"title": "", "memberIds": []}, "title"),
        ({"title": "   ", "memberIds": []}, "title"),
        ({"title": 5, "memberIds": []}, "title"),
        ({"title": "x" * 201, "memberIds": []}, "title"),
        ({"title": "T", "memberIds": "usr_1"}, "memberIds"),
        ({"title": "T", "memberIds": [1]}, "memberIds"),
        ({"title": "T", "memberIds": ["dlg_1"]}, "memberIds"),
        ({"title": "T", "memberIds": ["usr_0000000000000000"]}, "memberIds"),
        ({"title": "T", "memberIds": {"a": 1}}, "memberIds"),
    ],
)
async def test_create_dialog_with_bad_fields_or_unknown_member_is_400(alice: Client, body: Any, field: str) -> None:
    assert_error(*await alice.call("POST", "/api/dialogs", body), 400, field)
    assert len(assert_ok(*await alice.call("GET", "/api/dialogs"))) == 1  # nothing was created


@pytest.mark.gen_test
async def test_get_dialog_returns_it_for_the_caller(alice: Client, bob: Client, dialog_id: str) -> None:
    sent = await alice.post_message(dialog_id, "hello")
    data = assert_ok(*await bob.call("GET", f"/api/dialogs/{dialog_id}"))
    assert set(data) == DIALOG_KEYS | {"receipts"}
    assert data["dialogId"] == dialog_id and data["title"] == "Demo"
    assert data["memberIds"] == [alice.user_id, bob.user_id]
    assert data["lastMessage"] == sent and data["unreadCount"] == 1
    assert assert_ok(*await alice.call("GET", f"/api/dialogs/{dialog_id}"))["unreadCount"] == 0


# -- message history ----------------------------------------------------------------------------------------


async def _post_many(client: Client, dialog_id: str, count: int) -> list[dict[str, Any]]:
    return [await client.post_message(dialog_id, f"m{i}") for i in range(count)]


def _ids(messages: list[dict[str, Any]]) -> list[str]:
    return [m["messageId"] for m in messages]


@pytest.mark.gen_test
async def test_history_pages_are_oldest_first_with_exact_boundaries(alice: Client, bob: Client, dialog_id: str) -> None:
    sent = await _post_many(alice, dialog_id, 7)
    ids = _ids(sent)
    path = f"/api/messages/dialog/{dialog_id}"

    async def page(query: str) -> list[str]:
        data = assert_ok(*await bob.call("GET", f"{path}?{query}"))
        assert all(set(m) == MESSAGE_KEYS for m in data)
        return _ids(data)

    assert assert_ok(*await bob.call("GET", path)) == sent
    assert await page("limit=3") == ids[4:]
    assert await page("limit=1") == ids[6:]
    assert await page("limit=7") == ids
    assert await page("limit=200") == ids
    assert await page(f"before={ids[3]}&limit=3") == ids[:3]
    assert await page(f"before={ids[3]}&limit=2") == ids[1:3]
    assert await page(f"before={ids[3]}&limit=50") == ids[:3]
    assert await page(f"before={ids[0]}") == []
    assert await page(f"after={ids[3]}&limit=3") == ids[4:]
    assert await page(f"after={ids[3]}&limit=2") == ids[4:6]
    assert await page(f"after={ids[6]}") == []
    assert await page(f"after={ids[0]}&before={ids[6]}") == ids[1:6]
    assert await page(f"after={ids[0]}&before={ids[6]}&limit=2") == ids[1:3]
    assert await page(f"after={ids[2]}&before={ids[3]}") == []
    assert await page(f"after={ids[5]}&before={ids[1]}") == []
    # Walking back page by page from the newest visits every message once.
    walked: list[str] = []
    query = "limit=3"
    while True:
        chunk = await page(query)
        if not chunk:
            break
        walked = chunk + walked
        query = f"limit=3&before={chunk[0]}"
    assert walked == ids


@pytest.mark.gen_test
async def test_history_default_limit_is_50_newest(alice: Client, ctx: AppContext, dialog_id: str) -> None:
    store = ctx.service.store
    ids = []
    for i in range(60):
        stamp = now_iso()
        message = Message(new_id("msg"), dialog_id, alice.user_id, f"n{i}", "text", {}, stamp, stamp)
        await store.write(queries.insert_message, message)
        ids.append(message.message_id)
    path = f"/api/messages/dialog/{dialog_id}"
    assert _ids(assert_ok(*await alice.call("GET", path))) == ids[10:]
    assert _ids(assert_ok(*await alice.call("GET", f"{path}?limit=200"))) == ids
    assert _ids(assert_ok(*await alice.call("GET", f"{path}?limit=50&before={ids[10]}"))) == ids[:10]


@pytest.mark.gen_test
async def test_history_of_an_empty_dialog_is_an_empty_list(alice: Client, dialog_id: str) -> None:
    assert assert_ok(*await alice.call("GET", f"/api/messages/dialog/{dialog_id}")) == []
    assert assert_ok(*await alice.call("GET", f"/api/messages/dialog/{dialog_id}?limit=1")) == []


@pytest.mark.gen_test
async def test_history_limit_out_of_range_or_not_an_integer_is_400(alice: Client, dialog_id: str) -> None:
    await alice.post_message(dialog_id, "x")
    for limit in ("0", "201", "-1", "abc", "1.5", "", "%20", "1e2", "%C2%B2", "99999999999999999999", "0x10"):
        assert_error(*await alice.call("GET", f"/api/messages/dialog/{dialog_id}?limit={limit}"), 400, "limit")


@pytest.mark.gen_test
async def test_history_cursor_that_is_not_a_message_of_the_dialog_is_400(alice: Client, dialog_id: str) -> None:
    mine = await alice.post_message(dialog_id, "here")
    other = assert_ok(*await alice.call("POST", "/api/dialogs", {"title": "Other"}), 201)
    elsewhere = await alice.post_message(other["dialogId"], "there")
    path = f"/api/messages/dialog/{dialog_id}"
    for field in ("before", "after"):
        for bad in (elsewhere["messageId"], "msg_0000000000000000", "garbage", "dlg_" + mine["messageId"][4:]):
            assert_error(*await alice.call("GET", f"{path}?{field}={bad}"), 400, field)
    assert_error(*await alice.call("GET", f"{path}?before={mine['messageId']}&after={elsewhere['messageId']}"), 400)


# -- posting --------------------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_post_message_is_201_with_the_stored_message_verbatim(alice: Client, bob: Client, dialog_id: str) -> None:
    content = "<b>bold</b> &amp; \"quoted\" \\ 'é' 中文 " + EMOJI + " \u0000 end"
    body = {"content": content, "type": "note", "meta": {"k": [1, 2.5, None, True, {"x": "y"}]}, "extra": 1}
    data = assert_ok(*await alice.call("POST", f"/api/messages/dialog/{dialog_id}", body), 201)
    assert set(data) == MESSAGE_KEYS
    assert data["content"] == content and data["type"] == "note" and data["meta"] == body["meta"]
    assert data["senderId"] == alice.user_id and data["dialogId"] == dialog_id
    assert data["clientMessageId"] is None and data["messageId"].startswith("msg_")
    assert data["createdAt"] == data["updatedAt"]
    assert len(data["createdAt"]) == 24 and data["createdAt"].endswith("Z")
    assert assert_ok(*await bob.call("GET", f"/api/messages/dialog/{dialog_id}")) == [data]
    plain = await alice.post_message(dialog_id, "defaults")
    assert plain["type"] == "text" and plain["meta"] == {}


@pytest.mark.gen_test
async def test_retry_with_same_client_message_id_returns_the_same_message_and_emits_nothing_new(
    alice: Client, bob: Client, dialog_id: str
) -> None:
    bob_ws = await bob.websocket()
    alice_ws = await alice.websocket()
    path = f"/api/messages/dialog/{dialog_id}"
    body = {"content": "once", "clientMessageId": "c-1"}
    first = assert_ok(*await alice.call("POST", path, body), 201)
    retry = assert_ok(*await alice.call("POST", path, body), 201)
    assert retry == first and first["clientMessageId"] == "c-1"
    # A retry whose content differs (say, re-encoded) is still the same send.
    assert assert_ok(*await alice.call("POST", path, {"content": "twice", "clientMessageId": "c-1"}), 201) == first
    got = await bob_ws.next_of("message:new")
    assert got["data"] == first
    assert (await alice_ws.next_of("message:new"))["data"] == first
    await bob_ws.nothing_within(0.3)
    await alice_ws.nothing_within(0.05)
    assert _ids(assert_ok(*await bob.call("GET", path))) == [first["messageId"]]
    # The id is per sender: Bob may use the same one for his own message.
    bobs = assert_ok(*await bob.call("POST", path, body), 201)
    assert bobs["messageId"] != first["messageId"]
    assert (await bob_ws.next_of("message:new"))["data"] == bobs
    bob_ws.close()
    alice_ws.close()


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "content"),
        ({"content": None}, "content"),
        ({"content": 5}, "content"),
        ({"content": ["a"]}, "content"),
        ({"content": {"text": "a"}}, "content"),
        ({"content": ""}, "content"),
        ({"content": "  \n\t "}, "content"),
        ({"content": "a" * 10001}, "content"),
        ({"content": EMOJI * 10001}, "content"),
        ({"content": "a", "type": 1}, "type"),
        ({"content": "a", "type": None}, "type"),
        ({"content": "a", "type": ""}, "type"),
        ({"content": "a", "type": "t" * 33}, "type"),
        ({"content": "a", "meta": []}, "meta"),
        ({"content": "a", "meta": "x"}, "meta"),
        ({"content": "a", "meta": None}, "meta"),
        ({"content": "a", "meta": 1}, "meta"),
        ({"content": "a", "clientMessageId": 1}, "clientMessageId"),
        ({"content": "a", "clientMessageId": ""}, "clientMessageId"),
        ({"content": "a", "clientMessageId": ["x"]}, "clientMessageId"),
        ({"content": "a", "clientMessageId": "c" * 129}, "clientMessageId"),
    ],
)
async def test_post_message_with_a_bad_field_is_400_naming_it(
    alice: Client, dialog_id: str, body: Any, field: str
) -> None:
    assert_error(*await alice.call("POST", f"/api/messages/dialog/{dialog_id}", body), 400, field)
    assert assert_ok(*await alice.call("GET", f"/api/messages/dialog/{dialog_id}")) == []


@pytest.mark.gen_test
async def test_content_length_is_counted_in_code_points(alice: Client, dialog_id: str) -> None:
    data = await alice.post_message(dialog_id, EMOJI * 10000)
    assert data["content"] == EMOJI * 10000
    assert (await alice.post_message(dialog_id, "a" * 10000))["content"] == "a" * 10000


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("raw", "mentions"),
    [
        (b'{"content": "\\ud800"}', ("content",)),
        (b'{"content": "ok \\udfff"}', ("content",)),
        (b'{"content": "\xed\xa0\x80"}', ()),
        (b'{"content": "\xff"}', ()),
        (b'{"content": "a", "meta": {"x": "\\ud800"}}', ("meta",)),
        (b'{"content": "a", "meta": {"x": NaN}}', ("meta",)),
        (b'{"content": "a", "meta": {"x": Infinity}}', ("meta",)),
        (b'{"content": "a", "meta": {"x": 1e400}}', ("meta",)),
        (b'{"content": "a", "meta": {"\\ud800": 1}}', ("meta",)),
        (b'{"content": "a"', ()),
        (b'{"content": "a",}', ()),
        (b'{content: "a"}', ()),
        (b"", ()),
        (b"null", ("object",)),
        (b"[]", ("object",)),
        (b'"content"', ("object",)),
        (b"42", ("object",)),
        (b'{"content": "a"} {}', ()),
        (b'{"content": "a", "meta": ' + b'{"a": ' * 100 + b"1" + b"}" * 100 + b"}", ("meta",)),
        (b'{"content": "a", "meta": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}", ()),
    ],
    ids=[
        "lone-high-surrogate-escape",
        "lone-low-surrogate-escape",
        "surrogate-as-utf8-bytes",
        "invalid-utf8",
        "surrogate-in-meta",
        "nan",
        "infinity",
        "overflowing-number",
        "surrogate-in-key",
        "truncated",
        "trailing-comma",
        "unquoted-key",
        "empty",
        "null",
        "array",
        "string",
        "number",
        "trailing-data",
        "nested-100-deep",
        "nested-5000-deep",
    ],
)
async def test_post_message_with_malformed_json_is_400(
    alice: Client, dialog_id: str, raw: bytes, mentions: tuple[str, ...]
) -> None:
    assert_error(*await alice.call("POST", f"/api/messages/dialog/{dialog_id}", raw=raw), 400, *mentions)


@pytest.mark.gen_test
async def test_body_over_max_body_size_is_413_with_content_length(alice: Client, dialog_id: str) -> None:
    path = f"/api/messages/dialog/{dialog_id}"
    filler = b'{"content": "a", "meta": {"pad": "' + b"x" * 70000 + b'"}}'
    assert_error(*await alice.call("POST", path, raw=filler), 413)
    assert_error(*await alice.call("POST", "/api/auth/login", raw=filler, token=""), 413)
    # Far over the limit, the answer comes before the body is read.
    assert_error(*await alice.call("POST", path, raw=b"x" * (3 * 1024 * 1024)), 413)
    assert assert_ok(*await alice.call("GET", path)) == []
    # Just under the limit is fine.
    under = b'{"content": "a", "meta": {"pad": "' + b"x" * (65536 - 40) + b'"}}'
    assert len(under) <= 65536
    assert_ok(*await alice.call("POST", path, raw=under), 201)


@pytest.mark.gen_test
async def test_body_over_max_body_size_is_413_when_chunked(alice: Client, dialog_id: str) -> None:
    async def chunked(total: int) -> tuple[int, Any]:
        async def produce(write: Any) -> None:
            await write(b'{"content": "a", "meta": {"pad": "')
            for _ in range(total // 8192):
                await write(b"x" * 8192)
            await write(b'"}}')

        response = await tornado.httpclient.AsyncHTTPClient().fetch(
            f"{alice.base_url}/api/messages/dialog/{dialog_id}",
            method="POST",
            body_producer=produce,
            headers={"Authorization": f"Bearer {alice.token}"},
            raise_error=False,
            request_timeout=10,
        )
        return response.code, jsonutil.loads(response.body) if response.body else None

    assert_error(*await chunked(80 * 1024), 413)
    # Far over the limit (past the listener's hard stop), still a JSON 413, not a bare 400.
    assert_error(*await chunked(3 * 1024 * 1024), 413)
    assert_ok(*await chunked(8 * 1024), 201)


# -- editing --------------------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_sender_edits_a_message_and_members_get_the_update(alice: Client, bob: Client, dialog_id: str) -> None:
    sent = await alice.post_message(dialog_id, "draft", clientMessageId="e-1")
    bob_ws = await bob.websocket()
    data = assert_ok(*await alice.call("PATCH", f"/api/messages/{sent['messageId']}", {"content": "final", "x": 1}))
    assert data["content"] == "final" and data["updatedAt"] > sent["updatedAt"]
    assert {k: v for k, v in data.items() if k not in ("content", "updatedAt")} == {
        k: v for k, v in sent.items() if k not in ("content", "updatedAt")
    }
    got = await bob_ws.next_of("message:update")
    assert got["data"] == data
    again = assert_ok(*await alice.call("PATCH", f"/api/messages/{sent['messageId']}", {"content": "final"}))
    assert again["updatedAt"] > data["updatedAt"]
    assert assert_ok(*await bob.call("GET", f"/api/messages/dialog/{dialog_id}")) == [again]
    bob_ws.close()


@pytest.mark.gen_test
async def test_only_the_sender_may_edit(alice: Client, bob: Client, carol: Client, dialog_id: str) -> None:
    sent = await alice.post_message(dialog_id, "mine")
    assert_error(*await bob.call("PATCH", f"/api/messages/{sent['messageId']}", {"content": "hacked"}), 403)
    assert_error(*await carol.call("PATCH", f"/api/messages/{sent['messageId']}", {"content": "hacked"}), 403)
    assert assert_ok(*await alice.call("GET", f"/api/messages/dialog/{dialog_id}"))[0]["content"] == "mine"


@pytest.mark.gen_test
async def test_edit_of_an_unknown_message_is_404_and_bad_content_400(alice: Client, dialog_id: str) -> None:
    for unknown in ("msg_0000000000000000", "nonexistent", "dlg_0000000000000000"):
        assert_error(*await alice.call("PATCH", f"/api/messages/{unknown}", {"content": "x"}), 404)
    sent = await alice.post_message(dialog_id, "mine")
    for body in ({}, {"content": ""}, {"content": " "}, {"content": 3}, {"content": "a" * 10001}):
        assert_error(*await alice.call("PATCH", f"/api/messages/{sent['messageId']}", body), 400, "content")
    assert_error(*await alice.call("PATCH", f"/api/messages/{sent['messageId']}", raw=b"{"), 400)


# -- typing and read ------------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_typing_is_204_and_reaches_a_member_who_joined(alice: Client, bob: Client, dialog_id: str) -> None:
    bob_ws = await bob.websocket()
    bob_ws.send({"type": "dialog:join", "dialogId": dialog_id})
    await bob_ws.next_of("dialog:joined")
    status, body = await alice.call("POST", f"/api/dialogs/{dialog_id}/typing", {"typing": True})
    assert status == 204 and body is None
    got = await bob_ws.next_of("typing:start")
    assert got["data"] == {"dialogId": dialog_id, "userId": alice.user_id}
    status, _ = await alice.call("POST", f"/api/dialogs/{dialog_id}/typing", {"typing": False})
    assert status == 204
    assert (await bob_ws.next_of("typing:stop"))["data"]["userId"] == alice.user_id
    bob_ws.close()


@pytest.mark.gen_test
async def test_typing_that_is_not_a_boolean_is_400(alice: Client, dialog_id: str) -> None:
    for body in ({}, {"typing": None}, {"typing": "true"}, {"typing": 1}, {"typing": [True]}):
        assert_error(*await alice.call("POST", f"/api/dialogs/{dialog_id}/typing", body), 400, "typing")
    assert_error(*await alice.call("POST", f"/api/dialogs/{dialog_id}/typing", raw=b"true"), 400)


@pytest.mark.gen_test
async def test_read_zeroes_the_callers_unread_and_tells_only_the_callers_connections(
    alice: Client, bob: Client, dialog_id: str
) -> None:
    first = await alice.post_message(dialog_id, "one")
    last = await alice.post_message(dialog_id, "two")
    bob_ws = await bob.websocket()
    alice_ws = await alice.websocket()
    assert assert_ok(*await bob.call("GET", f"/api/dialogs/{dialog_id}"))["unreadCount"] == 2
    data = assert_ok(*await bob.call("POST", f"/api/dialogs/{dialog_id}/read", {"messageId": first["messageId"]}))
    assert data["unreadCount"] == 1 and set(data) == DIALOG_KEYS
    assert (await bob_ws.next_of("dialog:update"))["data"] == data
    data = assert_ok(*await bob.call("POST", f"/api/dialogs/{dialog_id}/read", {"messageId": last["messageId"]}))
    assert data["unreadCount"] == 0 and data["lastMessage"] == last and data["dialogId"] == dialog_id
    update = await bob_ws.next_of("dialog:update")
    assert update["data"] == data and update["cursor"]
    # Reading an older message again never raises the count back.
    data = assert_ok(*await bob.call("POST", f"/api/dialogs/{dialog_id}/read", {"messageId": first["messageId"]}))
    assert data["unreadCount"] == 0
    assert assert_ok(*await bob.call("GET", "/api/dialogs"))[0]["unreadCount"] == 0
    await alice_ws.nothing_within(0.3)
    bob_ws.close()
    alice_ws.close()


@pytest.mark.gen_test
async def test_read_with_a_bad_message_id_is_an_error(alice: Client, dialog_id: str) -> None:
    other = assert_ok(*await alice.call("POST", "/api/dialogs", {"title": "Other"}), 201)
    elsewhere = await alice.post_message(other["dialogId"], "there")
    path = f"/api/dialogs/{dialog_id}/read"
    assert_error(*await alice.call("POST", path, {"messageId": elsewhere["messageId"]}), 400, "messageId")
    assert_error(*await alice.call("POST", path, {"messageId": "msg_0000000000000000"}), 404)
    for body in ({}, {"messageId": 1}, {"messageId": None}, {"messageId": "dlg_1"}, {"messageId": ""}):
        assert_error(*await alice.call("POST", path, body), 400, "messageId")


# -- who may call what ------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_non_member_gets_403_on_every_dialog_endpoint(alice: Client, carol: Client, dialog_id: str) -> None:
    sent = await alice.post_message(dialog_id, "private")
    for method, path, body in dialog_paths(dialog_id, sent["messageId"]):
        assert_error(*await carol.call(method, path, body), 403)
        # Even with a body that would be bad: membership is checked first.
        if body is not None:
            assert_error(*await carol.call(method, path, raw=b"{"), 403)
    assert dialog_id not in [d["dialogId"] for d in assert_ok(*await carol.call("GET", "/api/dialogs"))]
    assert assert_ok(*await alice.call("GET", f"/api/messages/dialog/{dialog_id}")) == [sent]


@pytest.mark.gen_test
async def test_unknown_dialog_or_message_is_404_on_every_endpoint(alice: Client, dialog_id: str) -> None:
    sent = await alice.post_message(dialog_id, "x")
    for unknown in ("dlg_0000000000000000", "nonexistent"):
        for method, path, body in dialog_paths(unknown, sent["messageId"])[:5]:
            assert_error(*await alice.call(method, path, body), 404)
    assert_error(*await alice.call("PATCH", "/api/messages/msg_0000000000000000", {"content": "x"}), 404)


@pytest.mark.gen_test
async def test_every_api_endpoint_needs_a_valid_token(alice: Client, ctx: AppContext, dialog_id: str) -> None:
    sent = await alice.post_message(dialog_id, "x")
    signer = TokenSigner(load_or_create_secret(ctx.config.state_path), 60, clock=lambda: time.time() - 3600)
    expired = signer.issue(alice.user_id)
    foreign = TokenSigner("another secret", 3600).issue(alice.user_id)
    valid = alice.token
    body, _, signature = valid.partition(".")
    tampered = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + signature
    endpoints = [
        ("GET", "/api/me", None),
        ("GET", "/api/dialogs", None),
        ("POST", "/api/dialogs", {"title": "T"}),
        *dialog_paths(dialog_id, sent["messageId"]),
        ("GET", "/api/poll", None),
    ]
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer garbage"},
        {"Authorization": "Bearer a.b"},
        {"Authorization": f"Bearer {expired}"},
        {"Authorization": f"Bearer {foreign}"},
        {"Authorization": f"Bearer {tampered}"},
        {"Authorization": f"Basic {valid}"},
        {"Authorization": valid},
    ]
    for method, path, payload in endpoints:
        for headers in bad_headers:
            status, answer = await alice.call(method, path, payload, token="", headers=headers)
            assert_error(status, answer, 401)
    status, answer = await alice.call("GET", "/api/me", token=expired)
    assert "expired" in assert_error(status, answer, 401)
    assert assert_ok(*await alice.call("GET", "/api/me"))["userId"] == alice.user_id


@pytest.mark.gen_test
async def test_unauthenticated_401_carries_www_authenticate(alice: Client) -> None:
    response = await tornado.httpclient.AsyncHTTPClient().fetch(f"{alice.base_url}/api/me", raise_error=False)
    assert response.code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.headers["Content-Type"].startswith("application/json")


# -- routes and methods ---------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_unknown_routes_are_json_404(alice: Client, dialog_id: str) -> None:
    for path in ("/api/nope", "/nope", f"/api/dialogs/{dialog_id}/nope", "/api/messages", "/api/auth/login/x"):
        assert_error(*await alice.call("GET", path), 404)
        assert_error(*await alice.call("POST", path, {"a": 1}), 404)
        assert_error(*await alice.call("GET", path, token=""), 404)


@pytest.mark.gen_test
async def test_undecodable_path_or_query_is_a_json_4xx(alice: Client, dialog_id: str) -> None:
    for path in ("/api/dialogs/%FF", "/api/messages/%FF", f"/api/messages/dialog/{dialog_id}?before=%FF"):
        status, body = await alice.call(
            "GET" if "dialog/" in path or "dialogs" in path else "PATCH",
            path,
            {"content": "x"} if "messages/%" in path else None,
        )
        assert_error(status, body, status)
        assert 400 <= status < 500, (path, status)


@pytest.mark.gen_test
async def test_healthz_needs_no_token(alice: Client) -> None:
    status, body = await alice.call("GET", "/healthz", token="")
    assert assert_ok(status, body) is not None


@pytest.mark.gen_test
async def test_wrong_method_is_json_405(alice: Client, dialog_id: str) -> None:
    sent = await alice.post_message(dialog_id, "x")
    wrong = [
        ("GET", "/api/auth/login", None),
        ("DELETE", "/api/me", None),
        ("PUT", "/api/dialogs", {"title": "x"}),
        ("DELETE", f"/api/dialogs/{dialog_id}", None),
        ("PATCH", f"/api/messages/dialog/{dialog_id}", {"content": "x"}),
        ("GET", f"/api/messages/{sent['messageId']}", None),
        ("GET", f"/api/dialogs/{dialog_id}/typing", None),
        ("GET", f"/api/dialogs/{dialog_id}/read", None),
    ]
    for method, path, body in wrong:
        assert_error(*await alice.call(method, path, body), 405)


@pytest.mark.gen_test
async def test_concurrent_retries_store_one_message(alice: Client, dialog_id: str) -> None:
    path = f"/api/messages/dialog/{dialog_id}"
    body = {"content": "race", "clientMessageId": "r-1"}
    answers = await asyncio.gather(*(alice.call("POST", path, body) for _ in range(8)))
    ids = {assert_ok(status, data, 201)["messageId"] for status, data in answers}
    assert len(ids) == 1
    assert len(assert_ok(*await alice.call("GET", path))) == 1


@pytest.mark.gen_test
async def test_u0000_is_kept_in_content_and_refused_elsewhere_the_same_on_both_stores(
    alice: Client, bob: Client, dialog_id: str
) -> None:
    path = f"/api/messages/dialog/{dialog_id}"
    for body, field in (({"content": "x", "type": "a\u0000b"}, "type"),
                        ({"content": "x", "clientMessageId": "c\u0000"}, "clientMessageId")):
        assert_error(*await alice.call("POST", path, body), 400, field)
    assert_error(*await alice.call("POST", "/api/dialogs", {"title": "T\u0000", "memberIds": []}), 400, "title")
    assert_error(*await alice.call("PATCH", f"/api/dialogs/{dialog_id}", {"title": "\u0000x"}), 400, "title")
    # A phone with U+0000 belongs to nobody: login says so as for any unknown phone.
    status, body = await alice.call("POST", "/api/auth/login", {"phone": "7911\u0000", "password": "x"}, token="")
    assert status == 401 and body["success"] is False
    sent = await alice.post_message(dialog_id, "a\u0000b\\0c")
    history = assert_ok(*await bob.call("GET", path))
    assert history[-1]["content"] == "a\u0000b\\0c" == sent["content"]
