"""Dialog membership over REST (PROTOCOL section 13) and who receives what as members come and go (section 9).

On both stores, over real sockets: renaming, adding, leaving and removing; who may do which; the one
`dialog:update` each change sends to the members before and after it; and that a member added later gets
none of the dialog's earlier events and a removed one nothing after, live and on replay from any cursor.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Client
from tests.test_rest import assert_error, assert_ok


async def patch(client: Client, dialog_id: str, body: Any) -> tuple[int, Any]:
    return await client.call("PATCH", f"/api/dialogs/{dialog_id}", body)


async def created_by(alice: Client, *members: Client, title: str = "Team") -> dict[str, Any]:
    """A dialog alice creates over REST (so she is its creator), with these members."""
    body = {"title": title, "memberIds": [m.user_id for m in members]}
    return assert_ok(*await alice.call("POST", "/api/dialogs", body), 201)  # type: ignore[no-any-return]


@pytest.mark.gen_test
async def test_a_dialog_made_over_rest_names_its_creator_and_one_from_the_cli_none(
    alice: Client, bob: Client, dialog_id: str
) -> None:
    team = await created_by(alice, bob)
    assert team["createdBy"] == alice.user_id
    assert assert_ok(*await bob.call("GET", f"/api/dialogs/{team['dialogId']}"))["createdBy"] == alice.user_id
    demo = assert_ok(*await alice.call("GET", f"/api/dialogs/{dialog_id}"))  # the seed's, made like the CLI's
    assert demo["createdBy"] is None


@pytest.mark.gen_test
async def test_any_member_renames_and_adds_and_each_change_is_one_update_to_members_before_and_after(
    alice: Client, bob: Client, carol: Client
) -> None:
    team = await created_by(alice, bob)
    dialog_id = team["dialogId"]
    sockets = {c.user_id: await c.websocket() for c in (alice, bob, carol)}
    data = assert_ok(*await patch(bob, dialog_id, {"title": "Renamed", "addMemberIds": [carol.user_id]}))
    assert data["title"] == "Renamed" and data["memberIds"] == [alice.user_id, bob.user_id, carol.user_id]
    assert data["createdBy"] == alice.user_id and data["updatedAt"] > team["updatedAt"]
    for ws in sockets.values():
        update = await ws.next_of("dialog:update")
        assert update["data"]["title"] == "Renamed" and update["data"]["memberIds"] == data["memberIds"]
        assert update["data"]["unreadCount"] == 0
        await ws.nothing_within(0.1)
    # Carol is in now: she reads, posts, and gets what comes next.
    assert assert_ok(*await carol.call("GET", f"/api/messages/dialog/{dialog_id}")) == []
    sent = await carol.post_message(dialog_id, "hello, I'm new")
    for ws in sockets.values():
        assert (await ws.next_of("message:new"))["data"] == sent


@pytest.mark.gen_test
async def test_the_dialog_update_carries_each_members_own_unread_count(
    alice: Client, bob: Client, carol: Client
) -> None:
    team = await created_by(alice, bob)
    dialog_id = team["dialogId"]
    for i in range(3):
        await alice.post_message(dialog_id, f"unread by bob {i}")
    alice_ws, bob_ws = await alice.websocket(), await bob.websocket()
    assert_ok(*await patch(alice, dialog_id, {"addMemberIds": [carol.user_id]}))
    assert (await alice_ws.next_of("dialog:update"))["data"]["unreadCount"] == 0
    assert (await bob_ws.next_of("dialog:update"))["data"]["unreadCount"] == 3
    # Replayed from the log (an old cursor, on another transport), the counts are the same.
    _, polled = await bob.poll(bob_ws.ready["data"]["cursor"], timeout="0")
    (update,) = polled["data"]["events"]
    assert update["type"] == "dialog:update" and update["data"]["unreadCount"] == 3


@pytest.mark.gen_test
async def test_a_member_who_leaves_gets_that_last_update_and_then_nothing_anywhere(
    alice: Client, bob: Client, carol: Client
) -> None:
    team = await created_by(alice, bob, carol)
    dialog_id = team["dialogId"]
    carol_ws = await carol.websocket()
    _, hello = await carol.poll()
    data = assert_ok(*await patch(carol, dialog_id, {"removeMemberIds": [carol.user_id]}))
    assert carol.user_id not in data["memberIds"]
    left = await carol_ws.next_of("dialog:update")
    assert left["data"]["memberIds"] == [alice.user_id, bob.user_id]
    after = await alice.post_message(dialog_id, "after carol left")
    await carol_ws.nothing_within(0.2)
    # Every way in is closed: history, posting, typing, read, a join, a poll naming it for typing.
    path = f"/api/messages/dialog/{dialog_id}"
    assert_error(*await carol.call("GET", path), 403)
    assert_error(*await carol.call("POST", path, {"content": "still here?"}), 403)
    assert_error(*await carol.call("POST", f"/api/dialogs/{dialog_id}/typing", {"typing": True}), 403)
    assert_error(*await carol.call("POST", f"/api/dialogs/{dialog_id}/read", {"messageId": after["messageId"]}), 403)
    assert_error(*await carol.call("GET", f"/api/dialogs/{dialog_id}"), 403)
    status, _ = await carol.poll(hello["data"]["cursor"], typing=dialog_id, timeout="0")
    assert status == 403
    carol_ws.send({"type": "dialog:join", "dialogId": dialog_id})
    assert (await carol_ws.next_of("error"))["data"]["code"] == "forbidden"
    # Replayed from before she left, on another transport: up to her leaving, nothing after.
    _, polled = await carol.poll(hello["data"]["cursor"], timeout="0")
    assert [e["type"] for e in polled["data"]["events"]] == ["dialog:update"]
    assert polled["data"]["events"][0]["data"]["memberIds"] == [alice.user_id, bob.user_id]


@pytest.mark.gen_test
async def test_a_member_added_later_gets_nothing_of_what_came_before(alice: Client, bob: Client, carol: Client) -> None:
    team = await created_by(alice, bob)
    dialog_id = team["dialogId"]
    _, hello = await carol.poll()  # carol's cursor, from before she was a member
    await alice.post_message(dialog_id, "before carol")
    assert_ok(*await patch(bob, dialog_id, {"addMemberIds": [carol.user_id]}))
    after = await alice.post_message(dialog_id, "after carol joined")
    _, polled = await carol.poll(hello["data"]["cursor"], timeout="0")
    assert [e["type"] for e in polled["data"]["events"]] == ["dialog:update", "message:new"]
    assert polled["data"]["events"][1]["data"] == after
    ws = await carol.websocket(cursor=hello["data"]["cursor"])
    assert [(await ws.next())["type"] for _ in range(2)] == ["dialog:update", "message:new"]
    await ws.nothing_within(0.1)
    # History is the dialog's, not the events': a member reads it whole (PROTOCOL section 2).
    history = assert_ok(*await carol.call("GET", f"/api/messages/dialog/{dialog_id}"))
    assert [m["content"] for m in history] == ["before carol", "after carol joined"]


@pytest.mark.gen_test
async def test_only_the_creator_removes_others(alice: Client, bob: Client, carol: Client) -> None:
    team = await created_by(alice, bob, carol)
    dialog_id = team["dialogId"]
    assert_error(*await patch(bob, dialog_id, {"removeMemberIds": [carol.user_id]}), 403, "creator")
    assert_error(*await patch(bob, dialog_id, {"removeMemberIds": [carol.user_id, bob.user_id]}), 403, "creator")
    data = assert_ok(*await bob.call("GET", f"/api/dialogs/{dialog_id}"))
    assert data["memberIds"] == [alice.user_id, bob.user_id, carol.user_id]  # a refused change changes nothing
    data = assert_ok(*await patch(alice, dialog_id, {"removeMemberIds": [carol.user_id]}))
    assert data["memberIds"] == [alice.user_id, bob.user_id]


@pytest.mark.gen_test
async def test_a_dialog_without_a_creator_is_left_but_never_shrunk_by_others(
    alice: Client, bob: Client, dialog_id: str
) -> None:
    assert_error(*await patch(alice, dialog_id, {"removeMemberIds": [bob.user_id]}), 403, "creator")
    assert_ok(*await patch(alice, dialog_id, {"title": "Still renamable"}))
    data = assert_ok(*await patch(bob, dialog_id, {"removeMemberIds": [bob.user_id]}))
    assert data["memberIds"] == [alice.user_id]


@pytest.mark.gen_test
async def test_bad_changes_are_400_a_stranger_403_an_unknown_dialog_404(
    alice: Client, bob: Client, carol: Client, dialog_id: str
) -> None:
    for body, field in (
        ({"addMemberIds": ["usr_0000000000000000"]}, "addMemberIds"),
        ({"removeMemberIds": ["usr_0000000000000000"]}, "removeMemberIds"),
        ({"addMemberIds": "not a list"}, "addMemberIds"),
        ({"addMemberIds": [1]}, "addMemberIds"),
        ({"addMemberIds": ["dlg_x"]}, "addMemberIds"),
        ({"title": ""}, "title"),
        ({"title": 5}, "title"),
        ({"title": "x" * 201}, "title"),
    ):
        assert_error(*await patch(alice, dialog_id, body), 400, field)
    assert_error(*await alice.call("PATCH", f"/api/dialogs/{dialog_id}", raw=b"{not json"), 400)
    assert_error(*await patch(carol, dialog_id, {"title": "mine now"}), 403)
    assert_error(*await patch(alice, "dlg_0000000000000000", {"title": "x"}), 404)
    assert_error(*await alice.call("PATCH", f"/api/dialogs/{dialog_id}", {"title": "x"}, token="not-a-token"), 401)
    # Nothing of it changed the dialog.
    data = assert_ok(*await bob.call("GET", f"/api/dialogs/{dialog_id}"))
    assert data["title"] == "Demo" and data["memberIds"] == [alice.user_id, bob.user_id]


@pytest.mark.gen_test
async def test_a_change_that_changes_nothing_sends_nothing(alice: Client, bob: Client, dialog_id: str) -> None:
    ws = await bob.websocket()
    data = assert_ok(*await patch(alice, dialog_id, {"title": "Demo", "addMemberIds": [bob.user_id]}))
    assert data["title"] == "Demo"
    await ws.nothing_within(0.2)
