"""Administration from the command line: users, dialogs and the demo data, straight on the store.

These run before (or beside) a server, with no broadcaster to tell: a running server reads new users and
dialogs from the store on first use.
"""

from __future__ import annotations

from collections.abc import Sequence

from chatserver.auth import hash_password
from chatserver.errors import NotFound
from chatserver.models import Dialog, User, check_text, new_id, now_iso
from chatserver.store import SQLiteStore

DEMO_USERS = (("79111111111", "Александр Петров"), ("79777777777", "Мария Иванова"))
DEMO_PASSWORD = "demo"  # noqa: S105 - the documented demo password
DEMO_TITLE = "Demo"


def add_user(store: SQLiteStore, phone: str, name: str, password: str) -> User:
    for field, value in (("phone", phone), ("name", name), ("password", password)):
        check_text(value, field, max_length=1024)
    return store.create_user(User(new_id("usr"), name, phone), hash_password(password))


def add_dialog(store: SQLiteStore, title: str, phones: Sequence[str]) -> Dialog:
    members = []
    for phone in phones:
        user = store.user_by_phone(phone)
        if user is None:
            raise NotFound(f"no user with phone {phone}", field="member")
        members.append(user.user_id)
    stamp = now_iso()
    dialog = Dialog(new_id("dlg"), check_text(title, "title", max_length=200), tuple(dict.fromkeys(members)),
                    stamp, stamp)
    return store.save_dialog(dialog)[1]


def ensure_demo(store: SQLiteStore) -> None:
    """The demo users and dialog of PROTOCOL section 1, created once however often this runs."""
    for phone, name in DEMO_USERS:
        if store.user_by_phone(phone) is None:
            add_user(store, phone, name, DEMO_PASSWORD)
    first = store.user_by_phone(DEMO_USERS[0][0])
    assert first is not None
    if store.dialog_with_title(first.user_id, DEMO_TITLE) is None:
        add_dialog(store, DEMO_TITLE, [phone for phone, _ in DEMO_USERS])
