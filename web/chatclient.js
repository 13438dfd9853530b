// chatclient.js: the browser client of chatserver (PROTOCOL sections 2 to 5). A plain ES module, no build
// step, no dependencies.
//
// It owns the connection to the server and hands the application one stream of events, whatever carries
// them: a WebSocket when one can be held; when not (a proxy that breaks WebSockets, a socket that goes
// silent), Server-Sent Events, or long-poll where a streamed response does not get through either. A network
// that refuses WebSockets while plain HTTP gets through is remembered (`webSocketRetry`, also across page loads),
// so WebSocket is tried there again only once in that long. One cursor spans every transport and
// reconnect, so nothing is lost or repeated when the carrier changes; a `reset` from the server tells the
// application to reload over REST. Messages are applied idempotently (by messageId, updates only when newer),
// and sends are optimistic: shown at once, retried with the same clientMessageId until the server has them.
//
// The tabs of one browser share one connection: the clients of one user on one origin elect a leader over a
// BroadcastChannel (TabGroup below); the leader holds the connection and hands every event it applies to the
// others, which apply it as their own. When the leader goes, another tab takes over from the cursor it
// holds, which is the last one the leader handed over. The long-lived token never appears in a URL: WebSocket
// and SSE URLs carry a one-use stream ticket (`POST /api/stream-ticket`).
//
// Receipts (PROTOCOL section 11): the tab holding the connection acknowledges what it applied, at most once a
// second while messages of others arrive, and every tab keeps where the other members of each dialog stand
// (delivered, read), from `dialog:receipt` events and `GET /api/dialogs/{id}`, to tell a message's status.
//
// It never touches the DOM: rendering is the application's (web/app.js).

const DEFAULTS = {
  baseUrl: "",
  transports: ["websocket", "sse", "longpoll"], // in order of preference
  heartbeatInterval: 15000, // a ping this often on an open WebSocket
  heartbeatTimeout: 10000, // and some frame back within this long, else the socket is dead
  connectTimeout: 10000, // from `new WebSocket` (or `new EventSource`) to its `ready` event
  sseSilence: 45000, // an SSE stream with no event this long is reopened from the cursor (a liveness check)
  pollTimeout: 25, // seconds the server may park a poll
  backoffBase: 500, // first retry within this many ms
  backoffCap: 10000, // and never a longer wait than this
  webSocketRetry: 300000, // after a WebSocket failed where plain HTTP got through: its next try no sooner
  shareTabs: true, // one connection for all the tabs of this user on this origin (needs BroadcastChannel)
  tabPing: 1000, // a follower tab asks the leader whether it is there this often
  tabTimeout: 3500, // and takes over when no answer came for this long
  electionWait: 200, // a tab claiming leadership waits this long for an objection
  typingThrottle: 3000, // a typing:start at most this often while the user keeps typing
  typingIdle: 3000, // typing:stop after this long without a keystroke
  typingExpiry: 5000, // a remote typing:start without a stop is forgotten after this long
  knownLimit: 20000, // message ids remembered for dedupe
  ackInterval: 1000, // acknowledgements at most this often while messages of others arrive
};

export const STATES = Object.freeze(["connecting", "websocket", "sse", "long-poll", "offline"]);
const BACKOFF_GROWTH = 1.5;
const BLOCKED_KEY = "chatserver.websocketBlockedUntil:";

/**
 * A REST answer that was not a success: `status` is the HTTP status (0 when the server was not reached);
 * `retryAfter`, the seconds a 429 said to wait (0 when it said nothing).
 */
export class ApiError extends Error {
  constructor(status, message, retryAfter = 0) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.retryAfter = retryAfter;
  }

  /** Worth retrying as is: the server was not reached, or was not able to answer. */
  get transient() {
    return this.status === 0 || this.status === 408 || this.status === 429 || this.status >= 500;
  }
}

/** Log in by phone and password: `{token, user}`. Rejects with an ApiError (401 on wrong credentials). */
export async function login(phone, password, { baseUrl = "" } = {}) {
  return request(baseUrl, null, "POST", "/api/auth/login", { phone, password });
}

async function request(baseUrl, token, method, path, body, signal) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(baseUrl + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
      signal,
    });
  } catch (error) {
    if (error && error.name === "AbortError") throw error;
    throw new ApiError(0, "the server cannot be reached");
  }
  if (response.status === 204) return null;
  let payload = null;
  try {
    payload = await response.json();
  } catch (error) {
    if (error && error.name === "AbortError") throw error;
    throw new ApiError(response.ok ? 502 : response.status, `unreadable answer (HTTP ${response.status})`);
  }
  if (!response.ok || !payload || payload.success !== true) {
    const retryAfter = Number(response.headers.get("Retry-After")) || 0;
    throw new ApiError(response.ok ? 502 : response.status, (payload && payload.error) || `HTTP ${response.status}`,
      retryAfter);
  }
  return payload.data;
}

function randomId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes); // unlike crypto.randomUUID, also there on plain-http pages
  return "c" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      if (signal) signal.removeEventListener("abort", done);
      resolve();
    }
    if (signal) {
      if (signal.aborted) done();
      else signal.addEventListener("abort", done, { once: true });
    }
  });
}

/**
 * A connection to chatserver for one logged-in user.
 *
 * Events (`client.on(type, handler)`, the handler gets the detail object):
 *   state            {state, previous}            connecting | websocket | sse | long-poll | offline
 *   status           the `status` snapshot        whenever state, retry time, role or WebSocket memory change
 *   message:new      message                      the server's copy, once per messageId; a message of this
 *                                                 client's own send carries the clientMessageId it replaces
 *   message:pending  message (pending: true)      an optimistic send, before the server has it
 *   message:failed   {message, error}             a send the server refused (4xx); not retried
 *   message:update   message                      only when newer (updatedAt) than what was seen
 *   dialog:update    dialog
 *   typing           {dialogId, userIds}          who is typing in a dialog now
 *   receipts         {dialogId, receipts}         where the other members of a dialog stand changed
 *   reset            {reason, cursor}             reload dialogs and the open dialog over REST
 *   unauthorized     {error}                      the token is no longer valid; the client has stopped
 */
export class ChatClient {
  constructor(options = {}) {
    this.options = { ...DEFAULTS, ...options };
    if (!this.options.token) throw new TypeError("ChatClient needs {token}");
    this.token = this.options.token;
    this.userId = this.options.userId || null;
    this.state = "connecting";
    this.transport = null; // "websocket" | "sse" | "longpoll" | null: what carries events now
    this.cursor = null;
    this.openDialogId = null;
    this.role = "solo"; // "solo" (no sharing), "leader" (holds the connection), "follower", "electing"
    this.retryAt = null; // when the next attempt to reconnect is due (ms since the epoch), while one waits
    this.webSocketBlockedUntil = this._loadBlocked(); // WebSocket is not tried before then (ms since the epoch)

    this._handlers = new Map();
    this._wakers = new Set(); // retries waiting out a backoff; the browser going online cuts them short
    this._onOffline = () => this._networkLost();
    this._onOnline = () => this._networkBack({ anyNetwork: true });
    this._onVisible = () => {
      if (document.visibilityState === "visible") this.retryNow();
      if (this._tabs) this._tabs.announce();
    };
    // A page put in the back-forward cache may come back: it keeps its place (and the others take over meanwhile).
    this._onPageHide = (event) => this._tabs && !event.persisted && this._tabs.leave();
    this._running = false;
    this._stop = null; // AbortController of everything started by start()
    this._failures = 0; // consecutive failed attempts to reach the server (poll backoff)
    this._wsFailures = 0; // consecutive WebSocket attempts that did not reach `ready`
    this._ws = null; // the live WebSocket session
    this._probe = null; // a background WebSocket attempt while polling
    this._probeTimer = null;
    this._quickTimer = null; // the one quick WebSocket retry after a socket that worked was closed
    this._poll = null; // {controller, done}: the running poll loop
    this._sse = null; // the live (or opening) EventSource session
    this._sseFailures = 0; // consecutive SSE streams that ended (0 while one is working)
    this._sseTimer = null; // a pending SSE reconnect
    this._tabs = null; // the TabGroup, when tabs share the connection
    this._known = new Map(); // messageId -> updatedAt
    this._pending = new Map(); // clientMessageId -> pending message
    this._outbox = []; // clientMessageIds waiting to be POSTed, in order
    this._outboxRunning = false;
    this._wakeOutbox = null;
    this._typingOut = null; // {dialogId, sentAt}
    this._typingIdleTimer = null;
    this._typingIn = new Map(); // dialogId -> Map(userId -> timer)
    this._created = new Map(); // messageId -> createdAt, to place a receipt's message in its dialog's order
    this._members = new Map(); // dialogId -> memberIds, from the last snapshot of the dialog
    this._receipts = new Map(); // dialogId -> Map(userId -> {userId, deliveredMessageId, readMessageId})
    this._receiptMoves = new Map(); // dialogId -> Map(userId -> n): receipt events applied, per member
    this._ackTimer = null; // the pending acknowledgement
    this._ackedAt = -Infinity; // when the last one went (performance.now())
    this._ackedCursor = null; // and what it acknowledged
  }

  get useWebSocket() {
    return this.options.transports.includes("websocket") && typeof WebSocket !== "undefined";
  }

  get useSSE() {
    return this.options.transports.includes("sse") && typeof EventSource !== "undefined";
  }

  get useLongPoll() {
    return this.options.transports.includes("longpoll") || !this.useSSE; // the last resort, always possible
  }

  /** Whether this tab holds the connection (it is the leader, or tabs do not share). */
  get holdsConnection() {
    return this.role === "leader" || this.role === "solo";
  }

  /** Where the connection is, in one object (also what the `status` event carries). */
  get status() {
    return {
      state: this.state,
      transport: this.transport,
      retryAt: this.retryAt,
      webSocketBlockedUntil: this.webSocketBlockedUntil > Date.now() ? this.webSocketBlockedUntil : null,
      role: this.role,
      tabs: this._tabs ? this._tabs.count : 1,
    };
  }

  /** Whether any tab of this browser sharing this connection is visible (this one, or one the leader hears from). */
  anyTabVisible() {
    if (typeof document !== "undefined" && document.visibilityState === "visible") return true;
    return Boolean(this._tabs && this._tabs.anyPeerVisible());
  }

  // -- events ---------------------------------------------------------------------------------------------

  /** Subscribe to an event type; returns the function that unsubscribes. */
  on(type, handler) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(handler);
    return () => this._handlers.get(type).delete(handler);
  }

  _emit(type, detail) {
    for (const handler of [...(this._handlers.get(type) || [])]) {
      try {
        handler(detail);
      } catch (error) {
        console.error(`chatclient: a ${type} handler failed`, error); // one handler never stops the stream
      }
    }
  }

  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    if (state !== "offline" && state !== "connecting") this.retryAt = null;
    this._emit("state", { state, previous });
    this._statusChanged();
    if (state === "websocket" || state === "sse" || state === "long-poll") this._kickOutbox();
  }

  _statusChanged() {
    const status = this.status;
    this._emit("status", status);
    if (this._tabs && this.role === "leader") this._tabs.heartbeat();
  }

  /** The leader's view of the connection, mirrored by a follower tab. */
  _mirror(status) {
    this.transport = status.transport;
    this.retryAt = status.retryAt;
    this.webSocketBlockedUntil = status.webSocketBlockedUntil || 0;
    if (status.state !== this.state) {
      const previous = this.state;
      this.state = status.state;
      this._emit("state", { state: status.state, previous });
      if (status.state === "websocket" || status.state === "sse" || status.state === "long-poll") this._kickOutbox();
    }
    this._emit("status", this.status);
  }

  // -- lifecycle ------------------------------------------------------------------------------------------

  /**
   * Take a position in the event stream, then connect (or follow the tab that is connected). Resolves once the
   * position is taken: load dialogs over REST after it, and nothing that happens in between is missed (it
   * arrives as events, deduplicated).
   */
  async start() {
    if (this._running) return;
    this._running = true;
    this._stop = new AbortController();
    this._setState("connecting");
    if (typeof window !== "undefined") {
      window.addEventListener("offline", this._onOffline);
      window.addEventListener("online", this._onOnline);
      window.addEventListener("pagehide", this._onPageHide);
    }
    if (typeof document !== "undefined") document.addEventListener("visibilitychange", this._onVisible);
    if (this.options.shareTabs && this.userId && typeof BroadcastChannel !== "undefined") {
      // Listening before the handshake: every event after the position it takes is handed over after this.
      this._tabs = new TabGroup(this, `chatserver:${this.options.baseUrl}:${this.userId}`);
      this.role = "electing";
    }
    await this._handshake();
    if (!this._running) return;
    if (this._tabs) this._tabs.join();
    else this._connect();
    this._kickOutbox(); // sends left pending by an earlier stop()
  }

  /** Close every connection and timer. Pending sends stay pending (start() again resumes them). */
  stop() {
    this._running = false;
    if (this._stop) this._stop.abort();
    if (typeof window !== "undefined") {
      window.removeEventListener("offline", this._onOffline);
      window.removeEventListener("online", this._onOnline);
      window.removeEventListener("pagehide", this._onPageHide);
    }
    if (typeof document !== "undefined") document.removeEventListener("visibilitychange", this._onVisible);
    if (this._tabs) this._tabs.close();
    this._tabs = null;
    this.role = "solo";
    this._disconnect();
    clearTimeout(this._typingIdleTimer);
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    for (const users of this._typingIn.values()) for (const timer of users.values()) clearTimeout(timer);
    this._typingIn.clear();
    this.retryAt = null;
    this._setState("offline");
  }

  /** Close every transport and cancel every reconnect; the cursor stays where it is. */
  _disconnect() {
    clearTimeout(this._probeTimer);
    clearTimeout(this._quickTimer);
    this._closeSession(this._ws);
    this._closeSession(this._probe);
    this._ws = this._probe = null;
    this._stopSSE();
    this._stopPolling();
    this.transport = null;
  }

  /** This tab now holds the connection (it was elected, or tabs do not share): connect from the cursor. */
  _lead() {
    if (!this._running) return;
    this.webSocketBlockedUntil = this._loadBlocked();
    this._failures = this._wsFailures = this._sseFailures = 0;
    this.transport = null;
    this.retryAt = null;
    if (this.state === "connecting") this._statusChanged();
    else this._setState("connecting");
    this._connect();
  }

  /** Another tab holds the connection: let go of this one's, keep the cursor, follow. */
  _follow() {
    this._disconnect();
    this._wakeAll();
  }

  async _handshake() {
    // A poll without a cursor answers at once with the current position.
    while (this._running && !this.cursor) {
      try {
        const data = await this.api("GET", "/api/poll", undefined, this._stop.signal);
        if (!this.cursor) this.cursor = data.cursor; // a leader's handed-over cursor, when one came meanwhile
        this._failures = 0;
      } catch (error) {
        if (!this._running || this._fatal(error)) return;
        if (this.role !== "follower") this._setState("offline");
        await this._nap(this._backoff(this._failures++), this._stop.signal);
      }
    }
  }

  _connect() {
    if (!this._running || !this.holdsConnection) return;
    if (this._webSocketAllowed()) this._openWebSocket(false);
    else {
      this._startFallback();
      this._scheduleProbe();
    }
  }

  /** No WebSocket: SSE where it works, else long-poll. Whichever runs is the only one applying events. */
  _startFallback() {
    if (!this._running || !this.holdsConnection || this._ws || this._sse || this._poll) return;
    if (this.useSSE) this._openSSE();
    else this._startPolling();
  }

  /** Stop SSE and long-poll; resolves once the cursor is settled (whatever they had is applied). */
  async _stopFallback() {
    this._stopSSE();
    await this._stopPolling();
  }

  /** Delay before retry number `attempt` (0-based): exponential, capped, with jitter (half to all of it). */
  _backoff(attempt) {
    const ceiling = Math.min(
      this.options.backoffCap,
      this.options.backoffBase * BACKOFF_GROWTH ** Math.min(attempt, 32),
    );
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }

  /** Wait out a backoff: `ms`, or less if the client stops, the browser comes back online, or retryNow(). */
  _nap(ms, signal) {
    return new Promise((resolve) => {
      const wake = () => {
        this._wakers.delete(wake);
        if (!this._wakers.size && this.retryAt !== null && this.holdsConnection) {
          this.retryAt = null;
          this._statusChanged();
        }
        resolve();
      };
      this._wakers.add(wake);
      this._retryDue(Date.now() + ms);
      sleep(ms, signal).then(wake);
    });
  }

  /** Say when the next reconnect is due (for "Reconnecting in N s"); the earliest one counts. */
  _retryDue(at) {
    if (!this.holdsConnection) return;
    if (this.retryAt === null || at < this.retryAt || this.retryAt < Date.now()) {
      this.retryAt = at;
      this._statusChanged();
    }
  }

  _wakeAll() {
    for (const wake of [...this._wakers]) wake();
  }

  /** The browser says the network is gone: what is open cannot carry anything, so stop waiting on it. */
  _networkLost() {
    if (!this._running || !this.holdsConnection) return;
    this._closeSession(this._ws, true);
    if (this._sse) this._endSSE(this._sse, { failed: true });
    if (this._poll && this._poll.attempt) this._poll.attempt.abort();
    this._setState("offline");
  }

  /**
   * Retry now whatever waits out a backoff (the connection, the handshake, unsent messages): the page's
   * "Retry now", the tab becoming visible. In a follower tab, the leader is asked to.
   */
  retryNow() {
    this._networkBack({ anyNetwork: false });
  }

  /** Back online (`anyNetwork`: perhaps another network, so what WebSocket did before says nothing now). */
  _networkBack({ anyNetwork }) {
    if (!this._running) return;
    if (this._wakeOutbox) this._wakeOutbox();
    if (!this.holdsConnection) {
      this._wakeAll(); // a handshake still waiting
      if (this._tabs) this._tabs.askRetry();
      return;
    }
    if (anyNetwork && this.webSocketBlockedUntil) this._rememberBlocked(0);
    this._wakeAll();
    if (this._sseTimer && !this._sse) {
      clearTimeout(this._sseTimer);
      this._sseTimer = null;
      if (!this._ws && !this._poll) this._openSSE();
    }
    if (this._quickTimer && !this._ws) {
      clearTimeout(this._quickTimer);
      this._quickTimer = null;
      this._openWebSocket(false);
    } else if (!this._ws && !this._probe && this._webSocketAllowed()) {
      clearTimeout(this._probeTimer);
      this._openWebSocket(true);
    }
  }

  _fatal(error) {
    if (error instanceof ApiError && error.status === 401) {
      this.stop();
      this._emit("unauthorized", { error: error.message });
      return true;
    }
    return false;
  }

  // -- what the network allows ----------------------------------------------------------------------------

  _webSocketAllowed() {
    return this.useWebSocket && Date.now() >= this.webSocketBlockedUntil;
  }

  _loadBlocked() {
    try {
      const until = Number(localStorage.getItem(BLOCKED_KEY + this.options.baseUrl));
      return Number.isFinite(until) && until > Date.now() ? until : 0;
    } catch {
      return 0; // no storage (a sandboxed frame): remembered for this page only
    }
  }

  /** WebSocket failed where plain HTTP got through: do not try it again before `until` (0: forget). */
  _rememberBlocked(until) {
    this.webSocketBlockedUntil = until;
    try {
      if (until) localStorage.setItem(BLOCKED_KEY + this.options.baseUrl, String(until));
      else localStorage.removeItem(BLOCKED_KEY + this.options.baseUrl);
    } catch {
      // no storage: remembered for this page only
    }
    this._statusChanged();
  }

  /** A one-use ticket for a WebSocket or EventSource URL (the token itself never goes into a URL). */
  async _ticket() {
    const data = await this.api("POST", "/api/stream-ticket", undefined, this._stop.signal);
    return data.ticket;
  }

  // -- WebSocket ------------------------------------------------------------------------------------------

  _webSocketUrl(ticket, cursor) {
    const base = new URL(this.options.baseUrl || "/", location.href);
    base.protocol = base.protocol === "https:" ? "wss:" : "ws:";
    base.pathname = "/ws";
    base.search = "";
    base.searchParams.set("ticket", ticket);
    if (cursor) base.searchParams.set("cursor", cursor);
    return base.toString();
  }

  /**
   * Open a WebSocket from the current cursor. A probe is a background attempt made while polling: its events
   * are held back until the poll has stopped, so that one transport at a time moves the cursor.
   */
  _openWebSocket(probe) {
    const session = { socket: null, cursor: this.cursor, ready: false, probe, buffer: [], timers: {}, ended: false };
    if (probe) this._probe = session;
    else this._ws = session;
    this._ticket().then(
      (ticket) => {
        if (session.ended || !this._running) return;
        session.ticketed = true; // the server was reached over plain HTTP just now
        let socket;
        try {
          socket = new WebSocket(this._webSocketUrl(ticket, session.cursor));
        } catch {
          this._webSocketEnded(session);
          return;
        }
        session.socket = socket;
        session.timers.connect = setTimeout(() => this._closeSession(session, true), this.options.connectTimeout);
        socket.onmessage = (event) => this._onSocketFrame(session, event.data);
        socket.onclose = () => this._webSocketEnded(session);
        socket.onerror = () => {}; // onclose follows, and says everything there is to say
      },
      () => this._webSocketEnded(session), // the server was not reached: nothing learnt about WebSocket
    );
  }

  _onSocketFrame(session, raw) {
    if (session.ended) return;
    clearTimeout(session.timers.silence);
    session.timers.silence = null;
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch {
      return;
    }
    if (!frame || typeof frame.type !== "string") return;
    if (!session.ready) {
      if (frame.type !== "ready") return;
      session.ready = true;
      clearTimeout(session.timers.connect);
      if (!session.cursor) session.cursor = frame.data.cursor;
      session.timers.heartbeat = setInterval(() => this._heartbeat(session), this.options.heartbeatInterval);
      if (session.probe) this._promoteProbe(session);
      else this._webSocketReady(session);
      return;
    }
    switch (frame.type) {
      case "pong":
      case "dialog:joined":
      case "dialog:left":
        return;
      case "error":
        console.warn("chatclient: the server refused a frame:", frame.data && frame.data.message);
        return;
      default:
        if (session.buffer) session.buffer.push(frame);
        else this._receive(frame);
    }
  }

  _heartbeat(session) {
    if (session.ended || session.socket.readyState !== WebSocket.OPEN) return;
    session.socket.send(JSON.stringify({ type: "ping" }));
    // Counted from the first unanswered ping: later pings do not push the deadline back.
    if (!session.timers.silence) {
      session.timers.silence = setTimeout(() => this._closeSession(session, true), this.options.heartbeatTimeout);
    }
  }

  _webSocketReady(session) {
    session.probe = false; // a promoted probe is now the connection, and ends like one
    this._ws = session;
    this.transport = "websocket";
    this._failures = 0;
    this._wsFailures = 0;
    clearTimeout(this._probeTimer);
    if (this.webSocketBlockedUntil) this._rememberBlocked(0);
    this._setState("websocket");
    const buffered = session.buffer;
    session.buffer = null;
    for (const frame of buffered) this._receive(frame);
    session.joined = new Set();
    this._syncTyping();
  }

  /**
   * A background WebSocket reached `ready`: stop SSE or polling, then hand it the stream if the cursor still fits.
   */
  async _promoteProbe(session) {
    await this._stopFallback();
    if (session.ended || !this._running || !this.holdsConnection) {
      if (this._running && this.holdsConnection && !this._ws) this._startFallback();
      return;
    }
    this._probe = null;
    if (session.cursor === this.cursor) {
      this._webSocketReady(session);
      return;
    }
    // The poll moved the cursor while the probe connected: reconnect from where the stream really is.
    this._closeSession(session);
    this._openWebSocket(false);
  }

  _webSocketEnded(session) {
    if (session.ended) return;
    session.ended = true;
    clearTimeout(session.timers.connect);
    clearTimeout(session.timers.silence);
    clearInterval(session.timers.heartbeat);
    if (!this._running || !this.holdsConnection) return;
    // A socket that failed before `ready` makes the next attempt back off further. If the server answered its
    // ticket request a moment before, plain HTTP gets through where WebSocket does not (a proxy that refuses
    // CONNECT or strips Upgrade): WebSocket is not tried again for `webSocketRetry`, here or after a reload.
    const online = typeof navigator === "undefined" || navigator.onLine !== false;
    const failed = !session.ready && !session.failedByUs;
    if (failed) this._wsFailures += 1;
    if (failed && session.ticketed && online) this._rememberBlocked(Date.now() + this.options.webSocketRetry);
    if (session.probe) {
      if (this._probe === session) this._probe = null;
      if (!this._ws) this._scheduleProbe();
      return;
    }
    if (this._ws !== session) return;
    this._ws = null;
    this.transport = null;
    if (session.ready && !session.failed && this._wsFailures === 0) {
      // A socket that worked was closed (a restart, a slow-client cut): one quick retry, then SSE or long-poll
      // while retrying in the background. A socket that went silent goes to the fallback at once: something on
      // the way is eating its frames, and another socket along the same way would likely fare no better.
      this._wsFailures = 1;
      this._setState("connecting");
      const wait = this._backoff(0);
      this._retryDue(Date.now() + wait);
      this._quickTimer = setTimeout(() => {
        this._quickTimer = null;
        if (this._running && this.holdsConnection && !this._ws && !this._sse && !this._poll) this._openWebSocket(false);
      }, wait);
      return;
    }
    if (session.ready) this._wsFailures += 1; // went silent, or the quick retry is spent
    this._startFallback();
    this._scheduleProbe();
  }

  _closeSession(session, failed = false) {
    if (!session || session.ended) return;
    session.failed = failed;
    session.failedByUs = !failed; // closed on purpose (stop, handover), not refused by the network
    const socket = session.socket;
    if (socket) {
      try {
        socket.close(failed ? 4000 : 1000);
      } catch {
        // already closing
      }
    }
    this._webSocketEnded(session); // at once: a dead peer may never complete the closing handshake
  }

  /** The next background WebSocket attempt: after the backoff, and never before the network allows it. */
  _scheduleProbe() {
    clearTimeout(this._probeTimer);
    if (!this._running || !this.useWebSocket || !this.holdsConnection) return;
    const blocked = this.webSocketBlockedUntil - Date.now();
    const wait = blocked > 0 ? blocked : this._backoff(Math.max(this._wsFailures - 1, 0));
    this._probeTimer = setTimeout(() => {
      if (this._running && this.holdsConnection && !this._ws && !this._probe) this._openWebSocket(true);
    }, wait);
  }

  _sendFrame(frame) {
    const session = this._ws;
    if (!session || !session.ready || session.socket.readyState !== WebSocket.OPEN) return false;
    session.socket.send(JSON.stringify(frame));
    return true;
  }

  /** The dialogs whose typing events the connection should carry: those open in this tab and in the others. */
  _typingDialogs() {
    const dialogs = new Set(this._tabs ? this._tabs.openDialogs() : []);
    if (this.openDialogId) dialogs.add(this.openDialogId);
    return dialogs;
  }

  /** Bring the connection's typing subscriptions in line with `_typingDialogs()` (after a change of either). */
  _syncTyping() {
    if (!this.holdsConnection) return;
    const wanted = this._typingDialogs();
    const session = this._ws;
    if (session && session.ready && session.joined) {
      for (const dialogId of session.joined) {
        if (!wanted.has(dialogId) && this._sendFrame({ type: "dialog:leave", dialogId })) session.joined.delete(dialogId);
      }
      for (const dialogId of wanted) {
        if (!session.joined.has(dialogId) && this._sendFrame({ type: "dialog:join", dialogId })) session.joined.add(dialogId);
      }
    } else if (this._sse && this._sse.typing !== [...wanted].sort().join(",")) {
      // The stream's `typing=` is fixed when it opens: reopen it from the cursor, nothing lost or repeated.
      this._endSSE(this._sse, { recycle: true });
    } else if (this._poll && this._poll.typing !== [...wanted].sort().join(",")) {
      this._restartPoll();
    }
  }

  // -- Server-Sent Events ---------------------------------------------------------------------------------

  _eventsUrl(ticket, typing) {
    const url = new URL(this.options.baseUrl || "/", location.href);
    url.pathname = "/api/events";
    url.search = "";
    url.searchParams.set("ticket", ticket); // EventSource cannot send headers
    if (this.cursor) url.searchParams.set("cursor", this.cursor);
    if (typing) url.searchParams.set("typing", typing);
    return url.toString();
  }

  /**
   * Open an EventSource from the current cursor. It counts as working once its `ready` event arrives within
   * `connectTimeout` (a proxy that buffers the stream never lets it through). Its own automatic reconnect is
   * never used: on any error it is closed and this client decides what comes next, from the cursor.
   */
  _openSSE() {
    clearTimeout(this._sseTimer);
    this._sseTimer = null;
    const session = { source: null, ready: false, ended: false, timers: {}, typing: "" };
    this._sse = session;
    this._ticket().then(
      (ticket) => {
        if (session.ended || !this._running) return;
        session.typing = [...this._typingDialogs()].sort().join(",");
        let source;
        try {
          source = new EventSource(this._eventsUrl(ticket, session.typing));
        } catch {
          this._sseEnded(session);
          return;
        }
        session.source = source;
        session.timers.connect = setTimeout(() => this._endSSE(session, { failed: true }), this.options.connectTimeout);
        source.onmessage = (event) => this._onSSEEvent(session, event.data);
        source.onerror = () => this._endSSE(session, { failed: true });
      },
      () => this._endSSE(session, { failed: true }),
    );
  }

  _onSSEEvent(session, raw) {
    if (session.ended) return;
    let event;
    try {
      event = JSON.parse(raw);
    } catch {
      return;
    }
    if (!event || typeof event.type !== "string") return;
    // The server's heartbeats are comments, which EventSource does not show: any event proves the stream is
    // alive, and a stream quiet for `sseSilence` is reopened from the cursor to find out whether it still is.
    clearTimeout(session.timers.silence);
    session.timers.silence = setTimeout(() => this._endSSE(session, { recycle: true }), this.options.sseSilence);
    if (!session.ready) {
      if (event.type !== "ready") return;
      session.ready = true;
      clearTimeout(session.timers.connect);
      this.transport = "sse";
      this._failures = 0;
      this._sseFailures = 0;
      this._setState("sse");
      return;
    }
    this._receive(event);
  }

  /** Close a session; `recycle` reopens the stream at once (new `typing=`, or a liveness check). */
  _endSSE(session, { failed = false, recycle = false } = {}) {
    if (!session || session.ended) return;
    session.failed = failed;
    session.recycle = recycle;
    this._sseEnded(session);
  }

  _sseEnded(session) {
    if (session.ended) return;
    session.ended = true;
    clearTimeout(session.timers.connect);
    clearTimeout(session.timers.silence);
    if (session.source) session.source.close();
    if (!this._running || this._sse !== session || !this.holdsConnection) return;
    this._sse = null;
    if (this.transport === "sse") this.transport = null;
    if (session.recycle) {
      this._openSSE();
      return;
    }
    if (session.ready && this._sseFailures === 0) {
      // A stream that worked was cut (a restart, a proxy's time limit): one retry within the backoff.
      this._sseFailures = 1;
      this._setState("connecting");
      this._retrySSE(this._backoff(0));
      return;
    }
    this._sseFailures += 1;
    // A stream that never reached `ready` (a buffering or refusing proxy), or failed again: long-poll.
    if (this.useLongPoll) this._startPolling();
    else this._retrySSE(this._backoff(this._sseFailures - 1));
  }

  _retrySSE(ms) {
    clearTimeout(this._sseTimer);
    this._retryDue(Date.now() + ms);
    this._sseTimer = setTimeout(() => {
      this._sseTimer = null;
      if (this._running && this.holdsConnection && !this._ws && !this._sse && !this._poll) this._openSSE();
    }, ms);
  }

  /** Close the SSE session (if any) and cancel its reconnect, without starting anything else. */
  _stopSSE() {
    clearTimeout(this._sseTimer);
    this._sseTimer = null;
    const session = this._sse;
    if (!session) return;
    this._sse = null; // first: its end must not start another transport
    if (this.transport === "sse") this.transport = null;
    this._sseEnded(session);
  }

  // -- long-poll ------------------------------------------------------------------------------------------

  _startPolling() {
    if (this._poll || !this._running || !this.holdsConnection) return;
    const poll = { controller: new AbortController(), attempt: null, restart: false, done: null, typing: "" };
    this._poll = poll;
    poll.done = this._pollLoop(poll);
  }

  /** Stop the poll loop; resolves when it has applied whatever it had, so the cursor is settled. */
  async _stopPolling() {
    const poll = this._poll;
    if (!poll) return;
    this._poll = null;
    poll.controller.abort();
    if (poll.attempt) poll.attempt.abort();
    await poll.done;
  }

  async _pollLoop(poll) {
    const signal = poll.controller.signal;
    // The first poll, and the first after a failure, is answered at once: it tells whether polling works.
    let parked = false;
    while (this._running && !signal.aborted) {
      if (!this.cursor) {
        await this._handshake();
        continue;
      }
      poll.restart = false;
      const timeout = parked ? this.options.pollTimeout : 0;
      const params = new URLSearchParams({ cursor: this.cursor, timeout: String(timeout) });
      poll.typing = [...this._typingDialogs()].sort().join(",");
      if (poll.typing) params.set("typing", poll.typing);
      poll.attempt = new AbortController();
      // The request may take the server's timeout and a little more; past that the network has lost it.
      const deadline = setTimeout(() => poll.attempt && poll.attempt.abort(), (timeout + 10) * 1000);
      try {
        const data = await this.api("GET", `/api/poll?${params}`, undefined, poll.attempt.signal);
        const recovered = this._failures > 0;
        this.transport = "longpoll";
        this._failures = 0;
        this._setState("long-poll");
        for (const event of data.events) this._receive(event);
        if (data.cursor) this.cursor = data.cursor;
        parked = true;
        if (recovered && this._sseFailures > 0 && this.useSSE && this._poll === poll && !signal.aborted) {
          // The server was out of reach: the SSE failure that brought us here may have been that outage, not
          // the network. Give SSE another chance, from the cursor; if it fails again, polling resumes.
          this._poll = null;
          this.transport = null;
          this._openSSE();
          break;
        }
      } catch (error) {
        if (signal.aborted || !this._running) break;
        if (poll.restart) continue; // re-issued with new parameters; the cursor has not moved
        if (this._fatal(error)) break;
        if (error instanceof ApiError && error.status === 400) {
          // The server cannot resume from this cursor: take a new position and have the application reload.
          this.cursor = null;
          await this._handshake();
          this._emit("reset", { reason: "invalid", cursor: this.cursor });
          continue;
        }
        parked = false;
        this.transport = null;
        this._setState("offline");
        await this._nap(this._backoff(this._failures++), signal);
      } finally {
        clearTimeout(deadline);
        poll.attempt = null;
      }
    }
  }

  /** Re-issue the parked poll (its `typing=` no longer names the open dialogs). The cursor is unchanged. */
  _restartPoll() {
    const poll = this._poll;
    if (!poll || !poll.attempt) return; // between requests: the next one reads the open dialogs anyway
    poll.restart = true;
    poll.attempt.abort();
  }

  // -- applying events ------------------------------------------------------------------------------------

  /** An event from this tab's own connection: applied here, handed to the other tabs, acknowledged. */
  _receive(event) {
    this._apply(event);
    if (this._tabs) this._tabs.share(event);
    if (event.type === "message:new" && event.data && event.data.senderId !== this.userId) this._scheduleAck();
  }

  // -- acknowledgements -----------------------------------------------------------------------------------

  /**
   * Acknowledge the cursor soon: at once after a quiet `ackInterval`, else when it has passed since the last
   * acknowledgement, so a stream of messages costs at most one a second. Only messages of others call for one:
   * nothing else moves a delivered position (PROTOCOL section 11), so acknowledging receipts or one's own sends
   * would cost requests that move nothing.
   */
  _scheduleAck() {
    if (this._ackTimer) return;
    const wait = Math.max(0, this._ackedAt + this.options.ackInterval - performance.now());
    this._ackTimer = setTimeout(() => {
      this._ackTimer = null;
      this._ack();
    }, wait);
  }

  /**
   * Send the acknowledgement: a frame on the WebSocket, `POST /api/ack` on SSE (which cannot write on its
   * stream). A long-poll needs none (its next poll, made at once, carries the cursor), nor does a transport
   * that is reconnecting (its resume carries it). One that fails is not repeated: the next one carries it.
   */
  _ack() {
    const cursor = this.cursor;
    if (!this._running || !this.holdsConnection || !cursor || cursor === this._ackedCursor) return;
    if (this.transport === "websocket") {
      if (!this._sendFrame({ type: "ack", cursor })) return;
    } else if (this.transport === "sse") {
      this.api("POST", "/api/ack", { cursor }, this._stop.signal).catch(() => {});
    } else {
      return;
    }
    this._ackedAt = performance.now();
    this._ackedCursor = cursor;
  }

  _apply(event) {
    const { type, data } = event;
    switch (type) {
      case "typing:start":
      case "typing:stop":
        this._remoteTyping(data.dialogId, data.userId, type === "typing:start");
        return; // ephemeral: no cursor
      case "reset":
        this.cursor = data.cursor || event.cursor;
        this._emit("reset", { reason: data.reason, cursor: this.cursor });
        return;
      case "message:new":
        this._acceptMessage(data);
        break;
      case "message:update":
        this._acceptUpdate(data);
        break;
      case "dialog:update":
        this._noteDialog(data);
        this._emit("dialog:update", data);
        break;
      case "dialog:receipt":
        this._receiptEvent(data);
        break;
      default:
        break; // a type this version does not know: skip it, keep its cursor
    }
    if (event.cursor) this.cursor = event.cursor;
  }

  _remember(message) {
    this._known.delete(message.messageId);
    this._known.set(message.messageId, message.updatedAt);
    if (!this._created.has(message.messageId)) this._created.set(message.messageId, message.createdAt);
    if (this._known.size > this.options.knownLimit) {
      const oldest = this._known.keys().next().value;
      this._known.delete(oldest);
      this._created.delete(oldest);
    }
  }

  /** A message the application loaded over REST: later events for it are then duplicates. */
  remember(messages) {
    for (const message of messages) {
      if (!message) continue;
      const seen = this._known.get(message.messageId);
      if (seen === undefined || message.updatedAt > seen) this._remember(message);
    }
  }

  /** Whether this message id was seen (over REST, an event or a POST answer). */
  knows(messageId) {
    return this._known.has(messageId);
  }

  _acceptMessage(message) {
    if (this._known.has(message.messageId)) {
      if (message.updatedAt > this._known.get(message.messageId)) this._acceptUpdate(message);
      return;
    }
    this._remember(message);
    if (message.clientMessageId && this._pending.has(message.clientMessageId)) {
      const mine = this._pending.get(message.clientMessageId);
      if (mine.dialogId === message.dialogId) this._pending.delete(message.clientMessageId);
    }
    const sender = this._typingIn.get(message.dialogId);
    if (sender && sender.has(message.senderId)) this._remoteTyping(message.dialogId, message.senderId, false);
    this._emit("message:new", message);
  }

  _acceptUpdate(message) {
    const seen = this._known.get(message.messageId);
    if (seen !== undefined && message.updatedAt <= seen) return;
    this._remember(message);
    this._emit("message:update", message);
  }

  // -- REST -----------------------------------------------------------------------------------------------

  /** One REST call with this client's token: resolves to `data`, rejects with an ApiError. */
  async api(method, path, body, signal) {
    try {
      return await request(this.options.baseUrl, this.token, method, path, body, signal);
    } catch (error) {
      if (error instanceof ApiError && error.status === 401 && this._running) this._fatal(error);
      throw error;
    }
  }

  me() {
    return this.api("GET", "/api/me");
  }

  async listDialogs() {
    const dialogs = await this.api("GET", "/api/dialogs");
    this.remember(dialogs.map((d) => d.lastMessage));
    for (const dialog of dialogs) this._noteDialog(dialog);
    return dialogs;
  }

  /** One dialog, with `receipts` (where every other member stands), which are taken in: see `receiptsIn`. */
  async getDialog(dialogId) {
    const moves = this._receiptMoves.get(dialogId);
    const before = new Map(moves || []);
    const dialog = await this.api("GET", `/api/dialogs/${encodeURIComponent(dialogId)}`);
    this.remember([dialog.lastMessage]);
    this._noteDialog(dialog);
    if (Array.isArray(dialog.receipts)) this._takeReceipts(dialogId, dialog.receipts, before);
    return dialog;
  }

  /** Users by id (extension; at most 200): only those sharing a dialog with this user, or this user. */
  users(userIds) {
    return this.api("GET", `/api/users?${new URLSearchParams({ ids: userIds.join(",") })}`);
  }

  /** The user with exactly this phone (extension), or null. */
  async userByPhone(phone) {
    const found = await this.api("GET", `/api/users?${new URLSearchParams({ phone })}`);
    return found.length ? found[0] : null;
  }

  async createDialog(title, memberIds) {
    const dialog = await this.api("POST", "/api/dialogs", { title, memberIds });
    this._noteDialog(dialog);
    return dialog;
  }

  /** A page of a dialog's messages, oldest first: the latest `limit`, or those before/after a message id. */
  async listMessages(dialogId, { limit = 50, before, after } = {}) {
    const params = new URLSearchParams({ limit: String(limit) });
    if (before) params.set("before", before);
    if (after) params.set("after", after);
    const messages = await this.api("GET", `/api/messages/dialog/${encodeURIComponent(dialogId)}?${params}`);
    this.remember(messages);
    return messages;
  }

  /** Edit an own message; the answer is applied like a `message:update` (once, whichever comes first). */
  async editMessage(messageId, content) {
    const message = await this.api("PATCH", `/api/messages/${encodeURIComponent(messageId)}`, { content });
    this._acceptUpdate(message);
    return message;
  }

  /** Mark a dialog read up to a message; the server answers every connection of this user with dialog:update. */
  async markRead(dialogId, messageId) {
    const dialog = await this.api("POST", `/api/dialogs/${encodeURIComponent(dialogId)}/read`, { messageId });
    this._noteDialog(dialog);
    return dialog;
  }

  // -- receipts -------------------------------------------------------------------------------------------

  /** A dialog's snapshot: its members are who receipts are counted over. */
  _noteDialog(dialog) {
    if (!dialog || !dialog.dialogId || !Array.isArray(dialog.memberIds)) return;
    const known = this._members.get(dialog.dialogId);
    if (this.userId && !dialog.memberIds.includes(this.userId)) {
      // Removed from it: nothing of it is told any more.
      this._members.delete(dialog.dialogId);
      this._receipts.delete(dialog.dialogId);
      this._receiptMoves.delete(dialog.dialogId);
      return;
    }
    this._members.set(dialog.dialogId, [...dialog.memberIds]);
    if (known && (known.length !== dialog.memberIds.length || known.some((id) => !dialog.memberIds.includes(id)))) {
      this._emit("receipts", { dialogId: dialog.dialogId, receipts: this.receiptsIn(dialog.dialogId) });
    }
  }

  /** A `dialog:receipt`: its `receipts` list every member that moved (the single fields repeat the first). */
  _receiptEvent(data) {
    if (!data || typeof data.dialogId !== "string") return;
    const moved = Array.isArray(data.receipts) ? data.receipts : [data];
    let moves = this._receiptMoves.get(data.dialogId);
    if (!moves) {
      moves = new Map();
      this._receiptMoves.set(data.dialogId, moves);
    }
    for (const entry of moved) if (entry && entry.userId) moves.set(entry.userId, (moves.get(entry.userId) || 0) + 1);
    this._takeReceipts(data.dialogId, moved, null);
  }

  /**
   * Take positions in. From a snapshot (`before`: the receipt events applied per member when it was asked for), a
   * member for whom an event came meanwhile keeps the event's: the event may be newer than the snapshot, and a
   * move the snapshot holds and the event did not has an event of its own still to come (receipts are events
   * of the log, and this client took its place in the log before it asked).
   */
  _takeReceipts(dialogId, entries, before) {
    let stands = this._receipts.get(dialogId);
    if (!stands) {
      stands = new Map();
      this._receipts.set(dialogId, stands);
    }
    const moves = this._receiptMoves.get(dialogId);
    let changed = false;
    for (const entry of entries) {
      if (!entry || typeof entry.userId !== "string" || entry.userId === this.userId) continue;
      if (before && moves && (moves.get(entry.userId) || 0) !== (before.get(entry.userId) || 0)) continue;
      const next = {
        userId: entry.userId,
        deliveredMessageId: entry.deliveredMessageId || null,
        readMessageId: entry.readMessageId || null,
      };
      const known = stands.get(entry.userId);
      if (known && known.deliveredMessageId === next.deliveredMessageId && known.readMessageId === next.readMessageId) {
        continue;
      }
      stands.set(entry.userId, next);
      changed = true;
    }
    if (changed) this._emit("receipts", { dialogId, receipts: this.receiptsIn(dialogId) });
  }

  /**
   * Where the other members of a dialog stand: `[{userId, deliveredMessageId, readMessageId}]`, one for every
   * member but this user (ids null where nothing is known yet). Loaded by `getDialog`, kept by `dialog:receipt`.
   */
  receiptsIn(dialogId) {
    const stands = this._receipts.get(dialogId) || new Map();
    const members = this._members.get(dialogId) || [...stands.keys()];
    return members
      .filter((userId) => userId !== this.userId)
      .map((userId) => stands.get(userId) || { userId, deliveredMessageId: null, readMessageId: null });
  }

  /** Whether a member's position (a message id) is at or after `message` in its dialog. */
  _reached(position, message) {
    if (!position) return false;
    if (position === message.messageId) return true;
    const at = this._created.get(position);
    // A position this client never saw is older than everything it loaded: it has seen every message since it
    // started, and every message it loaded over REST.
    return at !== undefined && at > message.createdAt;
  }

  /**
   * The status of one of this user's messages: `{state, delivered, read, members}`, with `state` one of
   * `pending` (not stored yet), `sent` (stored), `delivered` (every other member has it) or `read` (every other
   * member has read it); `delivered` and `read` count the other members that have it, have read it, of
   * `members`. A message's place is its `createdAt`, the order the server accepted it in.
   */
  messageStatus(message) {
    if (!message.messageId) return { state: "pending", delivered: 0, read: 0, members: 0 };
    const others = this.receiptsIn(message.dialogId);
    let delivered = 0;
    let read = 0;
    for (const stand of others) {
      const hasRead = this._reached(stand.readMessageId, message);
      if (hasRead) read += 1;
      if (hasRead || this._reached(stand.deliveredMessageId, message)) delivered += 1; // read implies delivered
    }
    const members = others.length;
    const state = members && read === members ? "read" : members && delivered === members ? "delivered" : "sent";
    return { state, delivered, read, members };
  }

  // -- optimistic send ------------------------------------------------------------------------------------

  /**
   * Send a message. It is emitted at once as `message:pending` and returned; the server's copy follows as
   * `message:new` carrying the same clientMessageId. Network failures are retried (same clientMessageId, so
   * the server stores it once) until the server answers; a refusal (4xx) emits `message:failed`.
   */
  sendMessage(dialogId, content, { type = "text", meta = {} } = {}) {
    const now = new Date().toISOString();
    const message = {
      messageId: null,
      dialogId,
      senderId: this.userId,
      content,
      type,
      meta,
      createdAt: now,
      updatedAt: now,
      clientMessageId: randomId(),
      pending: true,
    };
    this._pending.set(message.clientMessageId, message);
    this._outbox.push(message.clientMessageId);
    this._emit("message:pending", message);
    this._kickOutbox();
    return message;
  }

  /** Send again a message that failed (`message:failed`), with its clientMessageId. */
  retry(clientMessageId) {
    const message = this._pending.get(clientMessageId);
    if (!message || this._outbox.includes(clientMessageId)) return;
    this._outbox.push(clientMessageId);
    this._emit("message:pending", message);
    this._kickOutbox();
  }

  /** The sends of a dialog the server has not confirmed yet, oldest first (to draw them when it is opened). */
  pendingIn(dialogId) {
    return [...this._pending.values()].filter((message) => message.dialogId === dialogId);
  }

  _kickOutbox() {
    if (this._wakeOutbox) this._wakeOutbox();
    if (!this._outboxRunning && this._outbox.length) this._drainOutbox();
  }

  async _drainOutbox() {
    this._outboxRunning = true;
    let attempt = 0;
    try {
      // One at a time, in order: the server sees the messages in the order they were written.
      while (this._outbox.length && this._running) {
        const clientMessageId = this._outbox[0];
        const message = this._pending.get(clientMessageId);
        if (!message) {
          this._outbox.shift();
          continue;
        }
        try {
          const stored = await this.api("POST", `/api/messages/dialog/${encodeURIComponent(message.dialogId)}`, {
            content: message.content,
            type: message.type,
            meta: message.meta,
            clientMessageId,
          });
          this._outbox.shift();
          attempt = 0;
          this._acceptMessage(stored); // a no-op when the event came first
          this._pending.delete(clientMessageId);
        } catch (error) {
          if (error instanceof ApiError && !error.transient) {
            this._outbox.shift();
            if (error.status === 401) return;
            this._emit("message:failed", { message, error });
            continue;
          }
          // Not reached, or not answered: wait (less if a transport comes back) and send it again as it was.
          // Refused for now (429): wait what the server said, at least, whatever else happens meanwhile.
          const floor = error instanceof ApiError ? error.retryAfter * 1000 : 0;
          await new Promise((resolve) => {
            const timer = setTimeout(resolve, Math.max(this._backoff(attempt++), floor));
            this._wakeOutbox = floor ? null : () => {
              clearTimeout(timer);
              resolve();
            };
          });
          this._wakeOutbox = null;
        }
      }
    } finally {
      this._outboxRunning = false;
    }
  }

  // -- typing ---------------------------------------------------------------------------------------------

  /**
   * The dialog the user has open: its typing events are delivered (dialog:join on the WebSocket, `typing=` on
   * the SSE stream and the poll), again after every reconnect.
   */
  setOpenDialog(dialogId) {
    if (dialogId === this.openDialogId) return;
    if (this._typingOut && this._typingOut.dialogId !== dialogId) this.stopTyping();
    this.openDialogId = dialogId || null;
    if (this._tabs) this._tabs.announce();
    this._syncTyping();
  }

  /** Call on every keystroke in the composer: sends typing:start at most every `typingThrottle` ms. */
  typing(dialogId = this.openDialogId) {
    if (!dialogId) return;
    const now = Date.now();
    if (this._typingOut && this._typingOut.dialogId !== dialogId) this.stopTyping();
    if (!this._typingOut || now - this._typingOut.sentAt >= this.options.typingThrottle) {
      this._typingOut = { dialogId, sentAt: now };
      this._sendTyping(dialogId, true);
    }
    clearTimeout(this._typingIdleTimer);
    this._typingIdleTimer = setTimeout(() => this.stopTyping(), this.options.typingIdle);
  }

  /** The user stopped typing (sent, cleared the composer, left): typing:stop, once. */
  stopTyping() {
    clearTimeout(this._typingIdleTimer);
    if (!this._typingOut) return;
    const { dialogId } = this._typingOut;
    this._typingOut = null;
    this._sendTyping(dialogId, false);
  }

  _sendTyping(dialogId, typing) {
    if (this._sendFrame({ type: typing ? "typing:start" : "typing:stop", dialogId })) return;
    // Over REST where this tab has no socket of its own (SSE, long-poll, or another tab holds the connection).
    if (this.state !== "long-poll" && this.state !== "sse" && this.role !== "follower") return; // offline: ephemeral
    this.api("POST", `/api/dialogs/${encodeURIComponent(dialogId)}/typing`, { typing }).catch(() => {});
  }

  _remoteTyping(dialogId, userId, started) {
    if (!dialogId || !userId || userId === this.userId) return;
    let users = this._typingIn.get(dialogId);
    if (!users) {
      if (!started) return;
      users = new Map();
      this._typingIn.set(dialogId, users);
    }
    clearTimeout(users.get(userId));
    const had = users.has(userId);
    if (started) {
      users.set(userId, setTimeout(() => this._remoteTyping(dialogId, userId, false), this.options.typingExpiry));
    } else {
      users.delete(userId);
      if (!users.size) this._typingIn.delete(dialogId);
    }
    if (had !== started) this._emit("typing", { dialogId, userIds: this.typingIn(dialogId) });
  }

  /** Users typing in a dialog now (other than this user). */
  typingIn(dialogId) {
    const users = this._typingIn.get(dialogId);
    return users ? [...users.keys()] : [];
  }
}

/**
 * The tabs of one user on one origin, sharing the connection of one of them (the leader) over a BroadcastChannel.
 *
 * Election: a tab that joins, or that finds the leader gone, claims leadership and waits `electionWait`; the
 * leader answers a claim at once (so does a tab that claimed with a smaller id), and the claim is dropped. Should
 * two leaders meet (claims that crossed, a tab back from a freeze), the one with the larger id gives way.
 * Followers ping the leader every `tabPing`; the leader's answer is a message, which background tabs' timer
 * throttling does not hold back. A follower that hears nothing for `tabTimeout` claims; a leader that leaves
 * says so (`bye`, on pagehide or stop) and the others claim at once.
 *
 * Every event the leader applies is handed over in order, and each follower applies it as its own; the leader's
 * heartbeat carries its cursor, which a follower adopts: it has every event up to it (one sender's messages
 * arrive in order), and it subscribed before it took its own first position. So whichever tab takes over
 * resumes from the last cursor the leader handed over, and nothing falls between two leaders.
 *
 * Messages: {t, from} with t one of claim, hb {status, cursor, tabs}, ping {dialogId, visible}, event {event},
 * bye {cursor}, retry.
 */
class TabGroup {
  constructor(client, name) {
    this.client = client;
    this.id = randomId();
    this.channel = new BroadcastChannel(name);
    this.channel.onmessage = (message) => this._onMessage(message.data);
    this.leaderId = null;
    this.lastHeard = 0; // when the leader was last heard from (performance.now())
    this.lastBeat = -Infinity; // when this tab, as leader, last sent a heartbeat
    this.peers = new Map(); // at the leader: follower id -> {dialogId, visible, seen}
    this.tabs = 1; // at a follower: how many tabs share the connection, as the leader last said
    this.claim = null; // {objected, timer} while this tab claims
    this.timer = null;
    this.closed = false;
  }

  get leading() {
    return this.client.role === "leader";
  }

  get count() {
    return this.leading ? 1 + this.peers.size : this.tabs;
  }

  join() {
    this.timer = setInterval(() => this._tick(), this.client.options.tabPing);
    this._claim();
  }

  /** Leave for good (the page goes, or the client stops): the others elect a leader at once. */
  leave() {
    if (this.closed) return;
    this._post({ t: "bye", cursor: this.leading ? this.client.cursor : null });
    this.closed = true;
    clearInterval(this.timer);
    if (this.claim) clearTimeout(this.claim.timer);
    this.claim = null;
  }

  close() {
    this.leave();
    this.channel.close();
  }

  _post(message) {
    if (!this.closed) this.channel.postMessage({ ...message, from: this.id });
  }

  _claim() {
    if (this.claim || this.closed) return;
    const claim = { objected: false, timer: null };
    this.claim = claim;
    this.leaderId = null;
    if (this.client.role !== "follower") this.client.role = "electing";
    this._post({ t: "claim" });
    claim.timer = setTimeout(() => {
      if (this.claim !== claim || this.closed) return;
      this.claim = null;
      if (claim.objected) {
        this.lastHeard = performance.now(); // the objector is taking over: give it the time to say so
        return;
      }
      this.leaderId = this.id;
      this.client.role = "leader";
      this.peers.clear();
      this.client._lead();
      this.heartbeat();
    }, this.client.options.electionWait);
  }

  _follow(leaderId) {
    const changed = this.leaderId !== leaderId;
    this.leaderId = leaderId;
    this.lastHeard = performance.now();
    if (this.claim) {
      clearTimeout(this.claim.timer);
      this.claim = null;
    }
    if (this.client.role !== "follower") {
      this.client.role = "follower";
      this.peers.clear();
      this.client._follow();
    }
    if (changed) this.announce(); // tell the new leader which dialog is open here
  }

  heartbeat() {
    const { state, transport, retryAt, webSocketBlockedUntil } = this.client.status;
    this.lastBeat = performance.now();
    this._post({
      t: "hb",
      status: { state, transport, retryAt, webSocketBlockedUntil },
      cursor: this.client.cursor,
      tabs: this.count,
    });
  }

  /** A follower tells the leader what it needs (its open dialog for typing events) and that it is visible. */
  announce() {
    if (this.leading) {
      this.client._syncTyping();
      return;
    }
    this._post({
      t: "ping",
      dialogId: this.client.openDialogId,
      visible: typeof document === "undefined" || document.visibilityState === "visible",
    });
  }

  askRetry() {
    this._post({ t: "retry" });
  }

  share(event) {
    if (this.leading) this._post({ t: "event", event });
  }

  openDialogs() {
    return this.leading ? [...this.peers.values()].map((peer) => peer.dialogId).filter(Boolean) : [];
  }

  anyPeerVisible() {
    return this.leading && [...this.peers.values()].some((peer) => peer.visible);
  }

  _tick() {
    if (this.closed) return;
    const now = performance.now();
    if (this.leading) {
      let dropped = false;
      for (const [id, peer] of this.peers) {
        if (now - peer.seen > this.client.options.tabTimeout) {
          this.peers.delete(id); // a tab that stopped pinging (closed without a word, or frozen)
          dropped = true;
        }
      }
      if (dropped) {
        this.client._syncTyping();
        this.client._statusChanged();
      }
    } else if (!this.claim && now - this.lastHeard > this.client.options.tabTimeout) {
      this._claim();
    } else {
      this.announce();
    }
  }

  _onMessage(message) {
    if (this.closed || !message || message.from === this.id) return;
    const client = this.client;
    switch (message.t) {
      case "claim":
        if (this.leading) this.heartbeat();
        else if (this.claim && message.from < this.id) this.claim.objected = true;
        break;
      case "hb":
        if (this.leading) {
          if (this.id > message.from) {
            this._follow(message.from); // two leaders: the larger id gives way
          } else {
            this.heartbeat();
            break;
          }
        } else {
          this._follow(message.from);
        }
        this.tabs = message.tabs || 1;
        if (message.cursor) client.cursor = message.cursor;
        client._mirror({ ...message.status, role: client.role });
        break;
      case "ping": {
        if (!this.leading) break;
        const known = this.peers.get(message.from);
        this.peers.set(message.from, { dialogId: message.dialogId, visible: message.visible, seen: performance.now() });
        if (!known || known.dialogId !== message.dialogId) client._syncTyping();
        if (!known) client._statusChanged(); // one more tab: the count changed (and a heartbeat goes out)
        else if (performance.now() - this.lastBeat > client.options.tabPing / 2) this.heartbeat();
        break;
      }
      case "event":
        client._apply(message.event);
        break;
      case "bye":
        if (this.peers.delete(message.from)) {
          client._syncTyping();
          client._statusChanged();
        }
        if (message.from === this.leaderId) {
          if (message.cursor) client.cursor = message.cursor;
          this._claim();
        }
        break;
      case "retry":
        if (this.leading) client.retryNow();
        break;
      default:
        break;
    }
  }
}
