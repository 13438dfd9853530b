// app.js: the chat page. Login, the dialog list, the open dialog (with the names of who wrote what, and how far
// one's own messages got: sent, delivered, read), the composer, a form to start a dialog by phone number, and the
// connection indicator, drawn from the events of ChatClient (web/chatclient.js).
//
// Two rules hold everywhere below. User data reaches the DOM through textContent only, never as HTML. And a
// change touches only the nodes it changes: a new message appends one node, a dialog update rewrites one row;
// nothing rebuilds a whole list in answer to an event.

import { ApiError, ChatClient, login } from "./chatclient.js";

const SESSION_KEY = "chatserver.session";
const PAGE_SIZE = 50;
const MAX_NODES = 4 * PAGE_SIZE; // messages in the list at most: what scrolled far away is paged out
const TITLE = document.title;
const MAX_NAME_IDS = 200; // per GET /api/users
const STATE_LABELS = {
  connecting: "Connecting…",
  websocket: "WebSocket",
  sse: "SSE",
  "long-poll": "Long-poll",
  offline: "Offline",
};

const $ = (id) => document.getElementById(id);
const view = {
  login: $("login-view"),
  loginForm: $("login-form"),
  loginPhone: $("login-phone"),
  loginPassword: $("login-password"),
  loginError: $("login-error"),
  chat: $("chat-view"),
  meName: $("me-name"),
  meAvatar: $("me-avatar"),
  connection: $("connection"),
  connectionLabel: $("connection-label"),
  reconnect: $("reconnect"),
  reconnectSeconds: $("reconnect-seconds"),
  retryNow: $("retry-now"),
  dialogs: $("dialogs"),
  newDialogButton: $("new-dialog-button"),
  newDialogForm: $("new-dialog-form"),
  newDialogTitle: $("new-dialog-title"),
  newDialogPhones: $("new-dialog-phones"),
  newDialogSubmit: $("new-dialog-submit"),
  newDialogCancel: $("new-dialog-cancel"),
  newDialogError: $("new-dialog-error"),
  notify: $("notify-button"),
  logout: $("logout-button"),
  empty: $("empty-state"),
  header: $("conversation-header"),
  title: $("dialog-title"),
  typing: $("typing"),
  scroll: $("message-scroll"),
  historyStatus: $("history-status"),
  messages: $("messages"),
  composer: $("composer"),
  input: $("composer-input"),
  editBanner: $("edit-banner"),
  cancelEdit: $("cancel-edit"),
};

let client = null;
let me = null;
const dialogs = new Map(); // dialogId -> {data, node}
let openId = null;
const messageNodes = new Map(); // messageId -> <li>, for the open dialog
const pendingNodes = new Map(); // clientMessageId -> <li>, for the open dialog
let hasOlder = false; // older messages than those shown exist
let hasNewer = false; // newer ones too: an older stretch is shown (paged in again on the way down)
let loadingOlder = false;
let loadingNewer = false;
let status = null; // the client's last status (connection, retry time, shared tabs)
let countdown = null; // the timer of "Reconnecting in N s"
let editing = null; // messageId being edited
let needsRead = false;
let readTimer = null;
let reloading = null;
let reloadAgain = false;
const names = new Map(); // userId -> name; "" while asked, or when the server would not say (no shared dialog)
const wantedNames = new Set(); // ids to ask for in the next batch
let namesTimer = null;

// -- small helpers ------------------------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function clock(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  const now = new Date();
  if (date.toDateString() === now.toDateString()) {
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }
  return date.toLocaleDateString([], { day: "numeric", month: "short" });
}

function initial(text) {
  return (text || "?").trim().charAt(0).toUpperCase() || "?";
}

function pageVisible() {
  return document.visibilityState === "visible";
}

function nearBottom() {
  const s = view.scroll;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
}

function scrollToBottom() {
  view.scroll.scrollTop = view.scroll.scrollHeight;
}

// -- session ------------------------------------------------------------------------------------------------

function savedSession() {
  try {
    const session = JSON.parse(localStorage.getItem(SESSION_KEY) || "null");
    return session && session.token && session.user ? session : null;
  } catch {
    return null;
  }
}

function showLogin(message = "") {
  view.chat.hidden = true;
  view.login.hidden = false;
  view.loginError.textContent = message;
  view.loginPhone.focus();
}

view.loginForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  view.loginError.textContent = "";
  const submit = $("login-submit");
  submit.disabled = true;
  try {
    const session = await login(view.loginPhone.value.trim(), view.loginPassword.value);
    localStorage.setItem(SESSION_KEY, JSON.stringify(session));
    view.loginPassword.value = "";
    await startChat(session);
  } catch (error) {
    view.loginError.textContent =
      error instanceof ApiError && error.status === 401 ? "Wrong phone or password." : error.message;
  } finally {
    submit.disabled = false;
  }
});

view.logout.addEventListener("click", () => signOut(""));

// Signed in or out in another tab: the same here (the session is the browser's, as the connection is).
window.addEventListener("storage", (event) => {
  if (event.key !== SESSION_KEY) return;
  const session = savedSession();
  if (!session && client) signOut("");
  else if (session && !client) startChat(session);
});

function signOut(message) {
  localStorage.removeItem(SESSION_KEY);
  if (client) client.stop();
  client = null;
  me = null;
  closeDialog();
  dialogs.clear();
  names.clear();
  wantedNames.clear();
  toggleNewDialog(false);
  view.dialogs.replaceChildren();
  document.title = TITLE;
  history.replaceState(null, "", location.pathname + location.search);
  showLogin(message);
}

async function startChat(session) {
  me = session.user;
  names.set(me.userId, me.name);
  view.meName.textContent = me.name;
  view.meAvatar.textContent = initial(me.name);
  view.login.hidden = true;
  view.chat.hidden = false;
  // `?transports=longpoll` (or `sse,longpoll`) turns WebSockets off, for networks whose proxies break them.
  const wanted = new URLSearchParams(location.search).get("transports");
  const options = { token: session.token, userId: me.userId };
  if (wanted) options.transports = wanted.split(",");
  const current = new ChatClient(options);
  client = current;
  client.on("status", showConnection);
  client.on("message:new", onMessage);
  client.on("message:pending", onPending);
  client.on("message:failed", onFailed);
  client.on("message:update", onUpdate);
  client.on("dialog:update", (dialog) => upsertDialog(dialog, { moveToTop: !dialogs.has(dialog.dialogId) }));
  client.on("typing", ({ dialogId, userIds }) => dialogId === openId && showTyping(userIds));
  client.on("receipts", ({ dialogId }) => dialogId === openId && showReceipts());
  client.on("reset", ({ reason }) => {
    console.info(`chat: the server reset the event stream (${reason}); reloading over REST`);
    reload();
  });
  client.on("unauthorized", () => signOut("Your session has ended. Please sign in again."));
  showConnection(client.status);
  updateNotifyButton();
  await current.start();
  if (client !== current) return; // signed out meanwhile
  await reload();
  const fromHash = location.hash.slice(1);
  if (fromHash && dialogs.has(fromHash)) openDialog(fromHash);
}

function showConnection(next) {
  status = next;
  const { state } = status;
  view.connection.dataset.state = state;
  view.connection.dataset.role = status.role;
  view.connectionLabel.textContent = STATE_LABELS[state] || state;
  view.connection.title = connectionTitle(status);
  showCountdown();
}

function connectionTitle({ state, webSocketBlockedUntil, tabs }) {
  const lines = [
    {
      websocket: "Live updates over WebSocket.",
      sse: "Live updates over Server-Sent Events.",
      "long-poll": "Live updates over HTTP long-polling.",
      connecting: "Connecting to the server…",
      offline: "The server cannot be reached; retrying.",
    }[state] || state,
  ];
  if (webSocketBlockedUntil) {
    const at = new Date(webSocketBlockedUntil).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    lines.push(`WebSocket is blocked on this network (a proxy refuses it): not tried again before ${at}.`);
  }
  if (tabs > 1) lines.push(`One connection for the ${tabs} tabs open here.`);
  return lines.join("\n");
}

/** "Reconnecting in N s - Retry now" while a reconnect waits out its backoff, counted down each second. */
function showCountdown() {
  clearTimeout(countdown);
  countdown = null;
  const waiting = status && status.retryAt && (status.state === "offline" || status.state === "connecting");
  const seconds = waiting ? Math.ceil((status.retryAt - Date.now()) / 1000) : 0;
  view.reconnect.hidden = seconds <= 0;
  if (seconds <= 0) return;
  view.reconnectSeconds.textContent = String(seconds);
  countdown = setTimeout(showCountdown, ((status.retryAt - Date.now()) % 1000) + 20);
}

view.retryNow.addEventListener("click", () => client && client.retryNow());

/** Dialogs and the open dialog from REST: at start, and after every reset. Serialised; coalesces repeats. */
async function reload() {
  if (reloading) {
    reloadAgain = true;
    return reloading;
  }
  reloading = (async () => {
    do {
      reloadAgain = false;
      try {
        syncDialogs(await client.listDialogs());
        if (openId && !dialogs.has(openId)) closeDialog();
        else if (openId) {
          loadReceipts(openId); // receipts of a stretch the stream lost are in the snapshot
          await refreshOpenDialog();
        }
      } catch (error) {
        if (!(error instanceof ApiError) || error.status !== 401) console.warn("chat: reload failed", error);
      }
    } while (reloadAgain && client);
  })();
  try {
    await reloading;
  } finally {
    reloading = null;
  }
}

// -- dialog list --------------------------------------------------------------------------------------------

function syncDialogs(list) {
  const seen = new Set();
  for (const dialog of list) {
    seen.add(dialog.dialogId);
    const entry = upsertDialog(dialog, { moveToTop: false });
    view.dialogs.appendChild(entry.node); // moves an existing row into the server's order
  }
  for (const [dialogId, entry] of dialogs) {
    if (!seen.has(dialogId)) {
      entry.node.remove();
      dialogs.delete(dialogId);
    }
  }
}

function createDialogRow(dialogId) {
  const node = el("li", "dialog");
  node.dataset.dialogId = dialogId;
  const button = el("button", "dialog-button");
  button.type = "button";
  const avatar = el("span", "avatar");
  avatar.setAttribute("aria-hidden", "true");
  const body = el("span", "dialog-body");
  const top = el("span", "dialog-top");
  top.append(el("span", "dialog-name"), el("time", "dialog-time"));
  const bottom = el("span", "dialog-bottom");
  const unread = el("span", "unread");
  unread.hidden = true;
  bottom.append(el("span", "preview"), unread);
  body.append(top, bottom);
  button.append(avatar, body);
  button.addEventListener("click", () => openDialog(dialogId));
  node.appendChild(button);
  return node;
}

function upsertDialog(dialog, { moveToTop }) {
  if (me && !dialog.memberIds.includes(me.userId)) {
    // Removed from it: its last dialog:update says so.
    const gone = dialogs.get(dialog.dialogId);
    if (gone) gone.node.remove();
    dialogs.delete(dialog.dialogId);
    if (openId === dialog.dialogId) closeDialog();
    return { node: el("li"), data: dialog };
  }
  let entry = dialogs.get(dialog.dialogId);
  if (!entry) {
    // A dialog shared with someone new: a name the server would not tell before, it will now.
    for (const userId of dialog.memberIds) if (names.get(userId) === "" && !wantedNames.has(userId)) names.delete(userId);
    entry = { data: dialog, node: createDialogRow(dialog.dialogId) };
    dialogs.set(dialog.dialogId, entry);
    view.dialogs.prepend(entry.node);
  } else {
    const last = entry.data.lastMessage;
    entry.data = { ...dialog };
    // A snapshot never takes back a newer last message this page already shows (e.g. a pending send).
    if (last && (!dialog.lastMessage || last.createdAt > dialog.lastMessage.createdAt)) entry.data.lastMessage = last;
    if (moveToTop) view.dialogs.prepend(entry.node);
  }
  renderDialog(entry);
  return entry;
}

function renderDialog(entry) {
  const { data, node } = entry;
  node.querySelector(".avatar").textContent = initial(data.title);
  node.querySelector(".dialog-name").textContent = data.title;
  const last = data.lastMessage;
  const preview = last ? (me && last.senderId === me.userId ? "You: " : "") + last.content : "No messages yet";
  node.querySelector(".preview").textContent = preview.length > 140 ? preview.slice(0, 140) + "…" : preview;
  const time = node.querySelector(".dialog-time");
  time.textContent = last ? clock(last.createdAt) : "";
  if (last) time.dateTime = last.createdAt;
  const unread = node.querySelector(".unread");
  unread.hidden = !data.unreadCount;
  unread.textContent = data.unreadCount ? String(data.unreadCount) : "";
  node.classList.toggle("has-unread", Boolean(data.unreadCount));
  node.classList.toggle("active", data.dialogId === openId);
  if (data.dialogId === openId) view.title.textContent = data.title;
  showUnreadInTitle();
}

/** The page's title carries the unread count of every dialog: "(3) chatserver". */
function showUnreadInTitle() {
  let unread = 0;
  for (const entry of dialogs.values()) unread += entry.data.unreadCount || 0;
  const title = unread ? `(${unread}) ${TITLE}` : TITLE;
  if (document.title !== title) document.title = title;
}

/** A message moves its dialog to the top and becomes its preview; from others, not being read, it is unread. */
function noteMessageInList(message, { counts }) {
  const entry = dialogs.get(message.dialogId);
  if (!entry) return false;
  const last = entry.data.lastMessage;
  const newer = !last || last.createdAt <= message.createdAt;
  if (newer || (message.clientMessageId && last.clientMessageId === message.clientMessageId)) {
    entry.data.lastMessage = message;
  }
  // One older than the last message the server showed us was already in that snapshot's unread count.
  if (counts && newer) entry.data.unreadCount = (entry.data.unreadCount || 0) + 1;
  if (view.dialogs.firstChild !== entry.node) view.dialogs.prepend(entry.node);
  renderDialog(entry);
  return true;
}

// -- the open dialog ----------------------------------------------------------------------------------------

async function openDialog(dialogId) {
  const entry = dialogs.get(dialogId);
  if (!entry || dialogId === openId) return;
  cancelEdit();
  const previous = dialogs.get(openId);
  openId = dialogId;
  if (previous) previous.node.classList.remove("active");
  entry.node.classList.add("active");
  if (location.hash.slice(1) !== dialogId) history.replaceState(null, "", `#${dialogId}`);
  view.empty.hidden = true;
  view.header.hidden = view.scroll.hidden = view.composer.hidden = false;
  view.title.textContent = entry.data.title;
  showTyping(client.typingIn(dialogId));
  client.setOpenDialog(dialogId);
  requestNames(entry.data.memberIds);
  needsRead = entry.data.unreadCount > 0;
  loadReceipts(dialogId);
  await showLatest(dialogId);
  if (openId !== dialogId) return;
  scheduleRead();
  view.input.focus();
}

/** The latest page of the open dialog, and its unconfirmed sends, instead of whatever was shown. */
async function showLatest(dialogId) {
  view.messages.replaceChildren();
  messageNodes.clear();
  pendingNodes.clear();
  hasOlder = hasNewer = false;
  view.historyStatus.textContent = "Loading…";
  try {
    const page = await client.listMessages(dialogId, { limit: PAGE_SIZE });
    if (openId !== dialogId) return;
    view.messages.replaceChildren(); // a send may have drawn its pending node meanwhile: drawn again below
    messageNodes.clear();
    pendingNodes.clear();
    appendPage(page);
    hasOlder = page.length === PAGE_SIZE;
    for (const pending of client.pendingIn(dialogId)) placeMessage(pending);
  } catch (error) {
    console.warn("chat: could not load messages", error);
  }
  if (openId !== dialogId) return;
  showHistoryStatus();
  scrollToBottom();
  fillViewport();
}

function closeDialog() {
  openId = null;
  if (client) client.setOpenDialog(null);
  cancelEdit();
  view.messages.replaceChildren();
  messageNodes.clear();
  pendingNodes.clear();
  hasOlder = hasNewer = false;
  view.empty.hidden = false;
  view.header.hidden = view.scroll.hidden = view.composer.hidden = true;
  for (const entry of dialogs.values()) entry.node.classList.remove("active");
}

/** After a reset: the latest page again, merged into what is shown (or instead of it, across a gap). */
async function refreshOpenDialog() {
  const dialogId = openId;
  if (hasNewer) return; // an older stretch is shown: the newest arrive as the reader scrolls down to them
  const page = await client.listMessages(dialogId, { limit: PAGE_SIZE });
  if (openId !== dialogId || hasNewer) return;
  const overlaps = page.some((m) => messageNodes.has(m.messageId));
  if (!overlaps && page.length === PAGE_SIZE && messageNodes.size) {
    // More came in meanwhile than one page holds: what is shown no longer joins up with it.
    for (const node of messageNodes.values()) node.remove();
    messageNodes.clear();
    hasOlder = true;
  }
  const stick = nearBottom();
  for (const message of page) placeMessage(message);
  if (stick) scrollToBottom();
  needsRead = true;
  scheduleRead();
}

function createMessageNode(message) {
  const mine = me && message.senderId === me.userId;
  const node = el("li", mine ? "message mine" : "message theirs");
  const bubble = el("div", "bubble");
  if (!mine) {
    const sender = el("p", "sender", names.get(message.senderId) || "");
    sender.dataset.senderId = message.senderId;
    bubble.appendChild(sender);
    requestNames([message.senderId]);
  }
  const text = el("p", "text", message.content);
  const meta = el("div", "meta");
  const edited = el("span", "edited", "edited");
  const time = el("time", "time");
  const status = el("span", "status");
  meta.append(edited, time, status);
  if (mine) {
    const edit = el("button", "edit-button", "Edit");
    edit.type = "button";
    edit.addEventListener("click", () => startEdit(node));
    meta.prepend(edit);
  }
  bubble.append(text, meta);
  node.appendChild(bubble);
  fillMessageNode(node, message);
  return node;
}

function fillMessageNode(node, message) {
  node.querySelector(".text").textContent = message.content;
  const time = node.querySelector(".time");
  time.textContent = clock(message.createdAt);
  time.dateTime = message.createdAt;
  node.querySelector(".edited").hidden = !message.messageId || message.updatedAt === message.createdAt;
  node.dataset.createdAt = message.createdAt;
  node.dataset.updatedAt = message.updatedAt;
  if (message.clientMessageId) node.dataset.clientMessageId = message.clientMessageId;
  const status = node.querySelector(".status");
  if (message.messageId) {
    node.dataset.messageId = message.messageId;
    node.classList.remove("pending", "failed");
    if (node.classList.contains("mine")) showReceipt(node);
    else status.textContent = "";
  } else {
    node.classList.add("pending");
    status.textContent = "Sending…";
  }
}

/**
 * Put one message of the open dialog on screen: confirm its pending node, update it, or add a node in order.
 * The server's messages stand in the server's order (by createdAt, which it assigns as it accepts them); sends it
 * has not confirmed stand below all of them, in the order they were written, and move to the server's position
 * when confirmed. Returns the node, or null for a message beyond the loaded stretch (`hasNewer`).
 */
function placeMessage(message) {
  if (message.messageId && messageNodes.has(message.messageId)) {
    const node = messageNodes.get(message.messageId);
    if (message.updatedAt > node.dataset.updatedAt) fillMessageNode(node, message);
    return node;
  }
  const cid = message.clientMessageId;
  if (cid && pendingNodes.has(cid)) {
    const node = pendingNodes.get(cid);
    fillMessageNode(node, message);
    if (message.messageId) {
      pendingNodes.delete(cid);
      messageNodes.set(message.messageId, node);
      keepingView(() => insertInOrder(node));
    }
    return node;
  }
  if (!message.messageId) {
    const node = createMessageNode(message);
    pendingNodes.set(cid, node);
    view.messages.appendChild(node);
    return node;
  }
  if (hasNewer) return null;
  const node = createMessageNode(message);
  messageNodes.set(message.messageId, node);
  insertInOrder(node);
  return node;
}

/** Insert (or move) a confirmed node after the last confirmed one not newer than it; pending ones stay below. */
function insertInOrder(node) {
  let after = view.messages.lastElementChild;
  while (after && (after === node || !after.dataset.messageId || after.dataset.createdAt > node.dataset.createdAt)) {
    after = after.previousElementSibling;
  }
  if (after) after.after(node);
  else view.messages.prepend(node);
}

/**
 * Change the list without moving what the reader looks at: at the bottom it stays at the bottom; elsewhere the
 * first message on screen keeps its place on screen.
 */
function keepingView(change) {
  if (nearBottom()) {
    change();
    scrollToBottom();
    return;
  }
  const top = view.scroll.getBoundingClientRect().top;
  let anchor = null;
  for (const node of view.messages.children) {
    if (node.getBoundingClientRect().bottom > top) {
      anchor = node;
      break;
    }
  }
  const before = anchor ? anchor.getBoundingClientRect().top : 0;
  change();
  if (anchor && anchor.isConnected) view.scroll.scrollTop += anchor.getBoundingClientRect().top - before;
}

/** Messages in order after everything confirmed that is shown (a first page, or a newer one). */
function appendPage(page) {
  const fragment = document.createDocumentFragment();
  for (const message of page) {
    if (messageNodes.has(message.messageId)) continue;
    const node = createMessageNode(message);
    messageNodes.set(message.messageId, node);
    fragment.appendChild(node);
  }
  const firstPending = [...view.messages.children].find((node) => !node.dataset.messageId);
  view.messages.insertBefore(fragment, firstPending || null);
}

function confirmedNodes() {
  return view.messages.querySelectorAll("[data-message-id]");
}

function showHistoryStatus() {
  view.historyStatus.textContent = hasOlder ? "" : "This is the beginning of the conversation.";
}

/**
 * Page out what scrolled far away, so that the list never holds more than MAX_NODES messages however long the
 * dialog: from the bottom after an older page came in (the newest then load again on the way down), from the
 * top after a newer page or live messages (the older ones load again on the way up). The view does not move.
 */
function pageOut(from) {
  const nodes = confirmedNodes();
  const excess = nodes.length - MAX_NODES;
  if (excess <= 0) return;
  if (from === "bottom") {
    for (const node of pendingNodes.values()) node.remove(); // drawn again with the newest page
    pendingNodes.clear();
    for (let i = nodes.length - excess; i < nodes.length; i += 1) {
      messageNodes.delete(nodes[i].dataset.messageId);
      nodes[i].remove();
    }
    hasNewer = true;
    return;
  }
  keepingView(() => {
    for (let i = 0; i < excess; i += 1) {
      messageNodes.delete(nodes[i].dataset.messageId);
      nodes[i].remove();
    }
  });
  hasOlder = true;
  showHistoryStatus();
}

async function loadOlder() {
  if (!openId || !hasOlder || loadingOlder) return;
  const oldest = view.messages.querySelector("[data-message-id]");
  if (!oldest) return;
  const dialogId = openId;
  loadingOlder = true;
  view.historyStatus.textContent = "Loading earlier messages…";
  try {
    const page = await client.listMessages(dialogId, { limit: PAGE_SIZE, before: oldest.dataset.messageId });
    if (openId !== dialogId) return;
    hasOlder = page.length === PAGE_SIZE;
    const fragment = document.createDocumentFragment();
    for (const message of page) {
      if (messageNodes.has(message.messageId)) continue;
      const node = createMessageNode(message);
      messageNodes.set(message.messageId, node);
      fragment.appendChild(node);
    }
    // Keep the view where it was: what was on screen stays on screen, the older page grows above it.
    const before = view.scroll.scrollHeight;
    view.messages.prepend(fragment);
    view.scroll.scrollTop += view.scroll.scrollHeight - before;
    pageOut("bottom");
  } catch (error) {
    console.warn("chat: could not load earlier messages", error);
  } finally {
    loadingOlder = false;
    if (openId === dialogId) showHistoryStatus();
  }
  fillViewport();
}

async function loadNewer() {
  if (!openId || !hasNewer || loadingNewer) return;
  const nodes = confirmedNodes();
  const newest = nodes[nodes.length - 1];
  if (!newest) return;
  const dialogId = openId;
  loadingNewer = true;
  try {
    // One more than a page: whether any are left after it is then known without another request.
    const page = await client.listMessages(dialogId, { limit: PAGE_SIZE + 1, after: newest.dataset.messageId });
    if (openId !== dialogId) return;
    appendPage(page);
    if (page.length <= PAGE_SIZE) {
      hasNewer = false; // the newest are on screen again, and so are the unconfirmed sends
      for (const pending of client.pendingIn(dialogId)) placeMessage(pending);
    }
    pageOut("top");
  } catch (error) {
    console.warn("chat: could not load later messages", error);
  } finally {
    loadingNewer = false;
  }
}

/** Load older pages until the list can scroll (a short first page leaves nothing to scroll up with). */
function fillViewport() {
  if (hasOlder && !loadingOlder && view.scroll.scrollHeight <= view.scroll.clientHeight) loadOlder();
}

view.scroll.addEventListener(
  "scroll",
  () => {
    if (view.scroll.scrollTop < 120) loadOlder();
    else if (hasNewer && view.scroll.scrollHeight - view.scroll.scrollTop - view.scroll.clientHeight < 120) loadNewer();
  },
  { passive: true },
);

// -- receipts -----------------------------------------------------------------------------------------------

/** Where the other members of a dialog stand, from the server (the client keeps it current from events). */
function loadReceipts(dialogId) {
  client.getDialog(dialogId).catch((error) => {
    if (!(error instanceof ApiError) || error.status !== 401) console.warn("chat: could not load receipts", error);
  });
}

/**
 * How far one of this user's stored messages got: Sent, Delivered or Read in a dialog of two; in a larger one,
 * how many of the others have read it once someone has ("Read by k of n"), else Sent or Delivered.
 */
function receiptText({ state, read, members }) {
  if (members > 1 && read > 0) return `Read by ${read} of ${members}`;
  return { sent: "Sent", delivered: "Delivered", read: "Read" }[state] || "";
}

/** Write one own message's status; only a node whose status changed is touched. */
function showReceipt(node) {
  const receipt = client.messageStatus({
    messageId: node.dataset.messageId,
    dialogId: openId,
    createdAt: node.dataset.createdAt,
  });
  const text = receiptText(receipt);
  const status = node.querySelector(".status");
  if (status.textContent !== text) status.textContent = text;
  if (status.dataset.receipt !== receipt.state) status.dataset.receipt = receipt.state;
}

/** The open dialog's receipts changed: the statuses of the own messages shown follow. */
function showReceipts() {
  for (const node of view.messages.querySelectorAll(".message.mine[data-message-id]")) showReceipt(node);
}

// -- names --------------------------------------------------------------------------------------------------

/** Ask for the names of these users: one batched GET /api/users for everything asked for in this turn. */
function requestNames(userIds) {
  for (const userId of userIds) if (userId && !names.has(userId)) wantedNames.add(userId);
  if (wantedNames.size && !namesTimer) namesTimer = setTimeout(fetchNames, 0);
}

async function fetchNames() {
  namesTimer = null;
  const current = client;
  if (!current) return;
  const ids = [...wantedNames].slice(0, MAX_NAME_IDS);
  for (const userId of ids) {
    wantedNames.delete(userId);
    names.set(userId, "");
  }
  try {
    for (const user of await current.users(ids)) {
      if (client !== current) return;
      names.set(user.userId, user.name);
      showName(user.userId);
    }
  } catch (error) {
    for (const userId of ids) if (names.get(userId) === "") names.delete(userId); // asked again next time
    if (!(error instanceof ApiError) || error.status !== 401) console.warn("chat: could not load names", error);
  }
  if (client === current && wantedNames.size && !namesTimer) namesTimer = setTimeout(fetchNames, 0);
}

function showName(userId) {
  const name = names.get(userId) || "";
  for (const node of view.messages.querySelectorAll(`.sender[data-sender-id="${CSS.escape(userId)}"]`)) {
    node.textContent = name;
  }
}

function showTyping(userIds) {
  view.typing.textContent = userIds.length === 0 ? "" : userIds.length === 1 ? "typing…" : `${userIds.length} people are typing…`;
}

// -- events from the client ---------------------------------------------------------------------------------

function onMessage(message) {
  const mine = me && message.senderId === me.userId;
  const isOpen = message.dialogId === openId;
  const beingRead = isOpen && pageVisible();
  if (!noteMessageInList(message, { counts: !mine && !beingRead })) {
    // A dialog this page does not list yet: its row comes from the server, counts included.
    client.getDialog(message.dialogId).then((dialog) => upsertDialog(dialog, { moveToTop: true }), () => {});
  }
  if (isOpen) {
    if (message.clientMessageId && pendingNodes.has(message.clientMessageId)) {
      placeMessage(message); // an own send confirmed: it moves to the server's position, the view stays
    } else {
      const stick = mine || nearBottom();
      if (placeMessage(message)) {
        if (stick) scrollToBottom();
        // Read at the bottom: the oldest go; read further up: this one goes again, until scrolled down to.
        pageOut(stick ? "top" : "bottom");
      }
    }
    if (!mine) {
      needsRead = true;
      scheduleRead();
    }
  }
  // One notification per browser: from the tab holding the connection, when no tab of it is being looked at.
  if (!mine && client.holdsConnection && !client.anyTabVisible()) notify(message);
}

async function onPending(message) {
  noteMessageInList(message, { counts: false });
  if (message.dialogId !== openId) return;
  if (hasNewer) {
    await showLatest(openId); // an older stretch was shown: the newest come back, this send among them
    return;
  }
  const node = placeMessage(message);
  node.classList.remove("failed");
  scrollToBottom();
}

function onFailed({ message, error }) {
  const node = pendingNodes.get(message.clientMessageId);
  if (!node) return;
  node.classList.add("failed");
  const status = node.querySelector(".status");
  status.replaceChildren(el("span", "", `Not sent: ${error.message}. `));
  const retry = el("button", "link-button", "Retry");
  retry.type = "button";
  retry.addEventListener("click", () => client.retry(message.clientMessageId));
  status.appendChild(retry);
}

function onUpdate(message) {
  const entry = dialogs.get(message.dialogId);
  if (entry && entry.data.lastMessage && entry.data.lastMessage.messageId === message.messageId) {
    entry.data.lastMessage = message;
    renderDialog(entry);
  }
  const node = messageNodes.get(message.messageId);
  if (node && message.updatedAt > node.dataset.updatedAt) fillMessageNode(node, message);
}

// -- reading and notifications ------------------------------------------------------------------------------

function scheduleRead() {
  clearTimeout(readTimer);
  readTimer = setTimeout(markRead, 200);
}

async function markRead() {
  const entry = dialogs.get(openId);
  if (!entry || !pageVisible() || !(needsRead || entry.data.unreadCount)) return;
  const nodes = view.messages.querySelectorAll("[data-message-id]");
  const last = nodes[nodes.length - 1];
  if (!last) return;
  needsRead = false;
  entry.data.unreadCount = 0;
  renderDialog(entry);
  try {
    upsertDialog(await client.markRead(openId, last.dataset.messageId), { moveToTop: false });
  } catch (error) {
    needsRead = true;
    console.warn("chat: could not mark the dialog read", error);
  }
}

document.addEventListener("visibilitychange", () => {
  if (pageVisible()) scheduleRead();
});

function updateNotifyButton() {
  view.notify.hidden = !("Notification" in window) || Notification.permission !== "default";
}

view.notify.addEventListener("click", async () => {
  await Notification.requestPermission();
  updateNotifyButton();
});

function notify(message) {
  if (!("Notification" in window) || Notification.permission !== "granted") return;
  const entry = dialogs.get(message.dialogId);
  // The body is plain text by the Notifications API's definition.
  const notification = new Notification(entry ? entry.data.title : "New message", {
    body: message.content.length > 200 ? message.content.slice(0, 200) + "…" : message.content,
    tag: message.dialogId,
  });
  notification.onclick = () => {
    window.focus();
    openDialog(message.dialogId);
    notification.close();
  };
}

// -- composer -----------------------------------------------------------------------------------------------

view.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  submitComposer();
});

view.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submitComposer();
  } else if (event.key === "Escape" && editing) {
    cancelEdit();
  }
});

view.input.addEventListener("input", () => {
  if (!openId || editing) return;
  if (view.input.value) client.typing(openId);
  else client.stopTyping();
});

view.cancelEdit.addEventListener("click", cancelEdit);

async function submitComposer() {
  const content = view.input.value;
  if (!openId || !content.trim()) return;
  if (editing) {
    const messageId = editing;
    try {
      await client.editMessage(messageId, content);
      cancelEdit();
    } catch (error) {
      view.editBanner.querySelector("span").textContent = `Could not save: ${error.message}`;
    }
    return;
  }
  view.input.value = "";
  client.stopTyping();
  client.sendMessage(openId, content);
}

function startEdit(node) {
  if (!node.dataset.messageId) return;
  editing = node.dataset.messageId;
  view.editBanner.querySelector("span").textContent = "Editing message";
  view.editBanner.hidden = false;
  view.input.value = node.querySelector(".text").textContent;
  view.input.focus();
}

function cancelEdit() {
  if (!editing) return;
  editing = null;
  view.editBanner.hidden = true;
  view.input.value = "";
}

// -- new dialog -------------------------------------------------------------------------------------------------

function toggleNewDialog(open) {
  view.newDialogForm.hidden = !open;
  view.newDialogButton.setAttribute("aria-expanded", String(open));
  view.newDialogError.textContent = "";
  if (open) view.newDialogTitle.focus();
  else view.newDialogForm.reset();
}

view.newDialogButton.addEventListener("click", () => toggleNewDialog(view.newDialogForm.hidden));
view.newDialogCancel.addEventListener("click", () => toggleNewDialog(false));

view.newDialogForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const current = client;
  const title = view.newDialogTitle.value.trim();
  const phones = [...new Set(view.newDialogPhones.value.split(/[\s,;]+/).filter(Boolean))];
  if (!current || !title || !phones.length) {
    view.newDialogError.textContent = "A title and at least one phone number, please.";
    return;
  }
  view.newDialogError.textContent = "";
  view.newDialogSubmit.disabled = true;
  try {
    // Each phone is looked up exactly (there is no directory to browse); every one must be someone.
    const found = await Promise.all(phones.map((phone) => current.userByPhone(phone)));
    const missing = phones.filter((_, i) => !found[i]);
    if (missing.length) {
      view.newDialogError.textContent = `Nobody has the phone number ${missing.join(", ")}.`;
      return;
    }
    for (const user of found) names.set(user.userId, user.name);
    const memberIds = found.map((user) => user.userId).filter((userId) => userId !== me.userId);
    const dialog = await current.createDialog(title, memberIds);
    if (client !== current) return;
    upsertDialog(dialog, { moveToTop: true });
    toggleNewDialog(false);
    openDialog(dialog.dialogId);
  } catch (error) {
    view.newDialogError.textContent = `Could not create the dialog: ${error.message}`;
  } finally {
    view.newDialogSubmit.disabled = false;
  }
});

window.addEventListener("hashchange", () => {
  const dialogId = location.hash.slice(1);
  if (client && dialogId && dialogs.has(dialogId)) openDialog(dialogId);
});

// -- start --------------------------------------------------------------------------------------------------

const session = savedSession();
if (session) startChat(session);
else showLogin();
