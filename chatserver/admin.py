"""Administration from the command line: users, dialogs, members and the demo data, through the one store.

These run before (or beside) a server. A dialog made or changed here is a change like any other: its
`dialog:update` is written to the durable log, and every server on the database delivers it (its log follower
reads it within the poll interval).
"""

from __future__ import annotations

from collections.abc import Sequence

from chatserver import queries
from chatserver.auth import hash_password
from chatserver.errors import BadRequest, NotFound
from chatserver.models import MAX_TITLE_LENGTH, Dialog, User, check_id, check_text, new_id, now_iso
from chatserver.store import Store

DEMO_USERS = (("79111111111", "Александр Петров"), ("79777777777", "Мария Иванова"))
DEMO_PASSWORD = "demo"  # noqa: S105 - the documented demo password
DEMO_TITLE = "Demo"
# What login accepts (ChatService.login): a user the CLI makes can always log in.
MAX_PHONE_LENGTH = 64
MAX_NAME_LENGTH = 200
MAX_PASSWORD_LENGTH = 1024


async def add_user(store: Store, phone: str, name: str, password: str) -> User:
    check_text(phone, "phone", max_length=MAX_PHONE_LENGTH)
    check_text(name, "name", max_length=MAX_NAME_LENGTH)
    check_text(password, "password", max_length=MAX_PASSWORD_LENGTH)
    password_hash = await store.offload(hash_password, password)
    return await store.write(queries.create_user, User(new_id("usr"), name, phone), password_hash)


async def _user_ids(store: Store, phones: Sequence[str], field: str) -> list[str]:
    ids = []
    for phone in phones:
        user = await store.read(queries.user_by_phone, phone)
        if user is None:
            raise NotFound(f"no user with phone {phone}", field=field)
        ids.append(user.user_id)
    return ids


async def add_dialog(store: Store, title: str, phones: Sequence[str]) -> Dialog:
    members = await _user_ids(store, phones, "member")
    if not members:
        raise BadRequest("a dialog needs at least one member", field="member")
    stamp = now_iso()
    dialog = Dialog(new_id("dlg"), check_text(title, "title", max_length=MAX_TITLE_LENGTH),
                    tuple(dict.fromkeys(members)), stamp, stamp)
    return (await store.write(queries.save_dialog, dialog)).after


async def change_members(store: Store, dialog_id: str, add: Sequence[str], remove: Sequence[str]) -> Dialog:
    """`dialogs members`: add and remove members by phone; the command line may remove anyone."""
    check_id(dialog_id, "dialog", "dlg")
    change = await store.write(
        queries.patch_dialog, dialog_id, title=None, add=await _user_ids(store, add, "add"),
        remove=await _user_ids(store, remove, "remove"), actor=None,
    )
    return change.after


async def ensure_demo(store: Store) -> None:
    """The demo users and dialog of PROTOCOL section 1, created once however often this runs."""
    for phone, name in DEMO_USERS:
        if await store.read(queries.user_by_phone, phone) is None:
            await add_user(store, phone, name, DEMO_PASSWORD)
    first = await store.read(queries.user_by_phone, DEMO_USERS[0][0])
    assert first is not None
    if await store.read(queries.dialog_with_title, first.user_id, DEMO_TITLE) is None:
        await add_dialog(store, DEMO_TITLE, [phone for phone, _ in DEMO_USERS])
