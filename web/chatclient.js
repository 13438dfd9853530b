// chatclient.js: the browser client of chatserver (PROTOCOL sections 2 to 5). A plain ES module, no build
// step, no dependencies.
//
// It owns the connection to the server and hands the application one stream of events, whatever carries
// them: a WebSocket when one can be held; when not (a proxy that breaks WebSockets, a socket that goes
// silent), Server-Sent Events, or long-poll where a streamed response does not get through either; and back to
// the WebSocket as soon as one works again. One cursor spans every transport and
// reconnect, so nothing is lost or repeated when the carrier changes; a `reset` from the server tells the
// application to reload over REST. Messages are applied idempotently (by messageId, updates only when newer),
// and sends are optimistic: shown at once, retried with the same clientMessageId until the server has them.
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
  backoffBase: 1000, // first retry within this many ms
  backoffCap: 30000,
  typingThrottle: 3000, // a typing:start at most this often while the user keeps typing
  typingIdle: 3000, // typing:stop after this long without a keystroke
  typingExpiry: 5000, // a remote typing:start without a stop is forgotten after this long
  knownLimit: 20000, // message ids remembered for dedupe
};

export const STATES = Object.freeze(["connecting", "websocket", "sse", "long-poll", "offline"]);

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
 *   message:new      message                      the server's copy, once per messageId; a message of this
 *                                                 client's own send carries the clientMessageId it replaces
 *   message:pending  message (pending: true)      an optimistic send, before the server has it
 *   message:failed   {message, error}             a send the server refused (4xx); not retried
 *   message:update   message                      only when newer (updatedAt) than what was seen
 *   dialog:update    dialog
 *   typing           {dialogId, userIds}          who is typing in a dialog now
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

    this._handlers = new Map();
    this._wakers = new Set(); // retries waiting out a backoff; the browser going online cuts them short
    this._onOffline = () => this._networkLost();
    this._onOnline = () => this._networkBack();
    this._running = false;
    this._stop = null; // AbortController of everything started by start()
    this._failures = 0; // consecutive failed attempts to reach the server (poll backoff)
    this._wsFailures = 0; // consecutive WebSocket attempts that did not reach `ready`
    this._ws = null; // the live WebSocket session
    this._probe = null; // a background WebSocket attempt while polling
    this._probeTimer = null;
    this._poll = null; // {controller, done}: the running poll loop
    this._sse = null; // the live (or opening) EventSource session
    this._sseFailures = 0; // consecutive SSE streams that ended (0 while one is working)
    this._sseTimer = null; // a pending SSE reconnect
    this._known = new Map(); // messageId -> updatedAt
    this._pending = new Map(); // clientMessageId -> pending message
    this._outbox = []; // clientMessageIds waiting to be POSTed, in order
    this._outboxRunning = false;
    this._wakeOutbox = null;
    this._typingOut = null; // {dialogId, sentAt}
    this._typingIdleTimer = null;
    this._typingIn = new Map(); // dialogId -> Map(userId -> timer)
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
    this._emit("state", { state, previous });
    if (state === "websocket" || state === "sse" || state === "long-poll") this._kickOutbox();
  }

  // -- lifecycle ------------------------------------------------------------------------------------------

  /**
   * Take a position in the event stream, then connect. Resolves once the position is taken: load dialogs over
   * REST after it, and nothing that happens in between is missed (it arrives as events, deduplicated).
   */
  async start() {
    if (this._running) return;
    this._running = true;
    this._stop = new AbortController();
    this._setState("connecting");
    if (typeof window !== "undefined") {
      window.addEventListener("offline", this._onOffline);
      window.addEventListener("online", this._onOnline);
    }
    await this._handshake();
    if (!this._running) return;
    this._connect();
    this._kickOutbox(); // sends left pending by an earlier stop()
  }

  /** Close every connection and timer. Pending sends stay pending (start() again resumes them). */
  stop() {
    this._running = false;
    if (this._stop) this._stop.abort();
    if (typeof window !== "undefined") {
      window.removeEventListener("offline", this._onOffline);
      window.removeEventListener("online", this._onOnline);
    }
    clearTimeout(this._probeTimer);
    this._closeSession(this._ws);
    this._closeSession(this._probe);
    this._ws = this._probe = null;
    this._stopSSE();
    this._stopPolling();
    clearTimeout(this._typingIdleTimer);
    for (const users of this._typingIn.values()) for (const timer of users.values()) clearTimeout(timer);
    this._typingIn.clear();
    this.transport = null;
    this._setState("offline");
  }

  async _handshake() {
    // A poll without a cursor answers at once with the current position.
    while (this._running && !this.cursor) {
      try {
        const data = await this.api("GET", "/api/poll", undefined, this._stop.signal);
        this.cursor = data.cursor;
        this._failures = 0;
      } catch (error) {
        if (!this._running || this._fatal(error)) return;
        this._setState("offline");
        await this._nap(this._backoff(this._failures++), this._stop.signal);
      }
    }
  }

  _connect() {
    if (!this._running) return;
    if (this.useWebSocket) this._openWebSocket(false);
    else this._startFallback();
  }

  /** No WebSocket: SSE where it works, else long-poll. Whichever runs is the only one applying events. */
  _startFallback() {
    if (!this._running || this._ws || this._sse || this._poll) return;
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
    const ceiling = Math.min(this.options.backoffCap, this.options.backoffBase * 2 ** Math.min(attempt, 16));
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }

  /** Wait out a backoff: `ms`, or less if the client stops or the browser comes back online. */
  _nap(ms, signal) {
    return new Promise((resolve) => {
      const wake = () => {
        this._wakers.delete(wake);
        resolve();
      };
      this._wakers.add(wake);
      sleep(ms, signal).then(wake);
    });
  }

  /** The browser says the network is gone: what is open cannot carry anything, so stop waiting on it. */
  _networkLost() {
    if (!this._running) return;
    this._closeSession(this._ws, true);
    if (this._sse) this._endSSE(this._sse, { failed: true });
    if (this._poll && this._poll.attempt) this._poll.attempt.abort();
    this._setState("offline");
  }

  /** And back: retry now rather than at the end of a backoff. */
  _networkBack() {
    if (!this._running) return;
    for (const wake of [...this._wakers]) wake();
    if (this._wakeOutbox) this._wakeOutbox();
    if (this._sseTimer && !this._sse) {
      clearTimeout(this._sseTimer);
      this._sseTimer = null;
      if (!this._ws && !this._poll) this._openSSE();
    }
    if (!this._ws && !this._probe && this.useWebSocket) {
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

  // -- WebSocket ------------------------------------------------------------------------------------------

  _webSocketUrl(cursor) {
    const base = new URL(this.options.baseUrl || "/", location.href);
    base.protocol = base.protocol === "https:" ? "wss:" : "ws:";
    base.pathname = "/ws";
    base.search = "";
    base.searchParams.set("token", this.token);
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
    let socket;
    try {
      socket = new WebSocket(this._webSocketUrl(session.cursor));
    } catch {
      this._webSocketEnded(session);
      return;
    }
    session.socket = socket;
    session.timers.connect = setTimeout(() => this._closeSession(session, true), this.options.connectTimeout);
    socket.onmessage = (event) => this._onSocketFrame(session, event.data);
    socket.onclose = () => this._webSocketEnded(session);
    socket.onerror = () => {}; // onclose follows, and says everything there is to say
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
        else this._apply(frame);
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
    this._setState("websocket");
    const buffered = session.buffer;
    session.buffer = null;
    for (const frame of buffered) this._apply(frame);
    if (this.openDialogId) this._sendFrame({ type: "dialog:join", dialogId: this.openDialogId });
  }

  /**
   * A background WebSocket reached `ready`: stop SSE or polling, then hand it the stream if the cursor still fits.
   */
  async _promoteProbe(session) {
    await this._stopFallback();
    if (session.ended || !this._running) {
      if (this._running && !this._ws) this._startFallback();
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
    if (!this._running) return;
    if (session.probe) {
      if (this._probe === session) this._probe = null;
      if (!session.ready) this._wsFailures += 1;
      if (!this._ws) this._scheduleProbe();
      return;
    }
    if (this._ws !== session) return;
    this._ws = null;
    this.transport = null;
    if (session.ready && !session.failed && this._wsFailures === 0) {
      // A socket that worked was closed (a restart, a slow-client cut): one quick retry, then long-poll while
      // retrying in the background. A socket that went silent goes to long-poll at once: something on the way
      // is eating its frames, and another socket along the same way would likely fare no better.
      this._wsFailures = 1;
      this._setState("connecting");
      setTimeout(
        () => this._running && !this._ws && !this._sse && !this._poll && this._openWebSocket(false),
        this._backoff(0),
      );
      return;
    }
    this._wsFailures += 1;
    this._startFallback();
    this._scheduleProbe();
  }

  _closeSession(session, failed = false) {
    if (!session || session.ended) return;
    session.failed = failed;
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

  _scheduleProbe() {
    clearTimeout(this._probeTimer);
    if (!this._running || !this.useWebSocket) return;
    this._probeTimer = setTimeout(() => {
      if (this._running && !this._ws && !this._probe) this._openWebSocket(true);
    }, this._backoff(Math.max(this._wsFailures - 1, 0)));
  }

  _sendFrame(frame) {
    const session = this._ws;
    if (!session || !session.ready || session.socket.readyState !== WebSocket.OPEN) return false;
    session.socket.send(JSON.stringify(frame));
    return true;
  }

  // -- Server-Sent Events ---------------------------------------------------------------------------------

  _eventsUrl() {
    const url = new URL(this.options.baseUrl || "/", location.href);
    url.pathname = "/api/events";
    url.search = "";
    url.searchParams.set("token", this.token); // EventSource cannot send headers
    if (this.cursor) url.searchParams.set("cursor", this.cursor);
    if (this.openDialogId) url.searchParams.set("typing", this.openDialogId);
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
    const session = { source: null, ready: false, ended: false, timers: {} };
    this._sse = session;
    let source;
    try {
      source = new EventSource(this._eventsUrl());
    } catch {
      this._sseEnded(session);
      return;
    }
    session.source = source;
    session.timers.connect = setTimeout(() => this._endSSE(session, { failed: true }), this.options.connectTimeout);
    source.onmessage = (event) => this._onSSEEvent(session, event.data);
    source.onerror = () => this._endSSE(session, { failed: true });
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
    this._apply(event);
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
    if (!this._running || this._sse !== session) return;
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
    this._sseTimer = setTimeout(() => {
      this._sseTimer = null;
      if (this._running && !this._ws && !this._sse && !this._poll) this._openSSE();
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
    if (this._poll || !this._running) return;
    const poll = { controller: new AbortController(), attempt: null, restart: false, done: null };
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
      if (this.openDialogId) params.set("typing", this.openDialogId);
      poll.attempt = new AbortController();
      // The request may take the server's timeout and a little more; past that the network has lost it.
      const deadline = setTimeout(() => poll.attempt && poll.attempt.abort(), (timeout + 10) * 1000);
      try {
        const data = await this.api("GET", `/api/poll?${params}`, undefined, poll.attempt.signal);
        const recovered = this._failures > 0;
        this.transport = "longpoll";
        this._failures = 0;
        this._setState("long-poll");
        for (const event of data.events) this._apply(event);
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

  /** Re-issue the parked poll (its `typing=` no longer names the open dialog). The cursor is unchanged. */
  _restartPoll() {
    const poll = this._poll;
    if (!poll || !poll.attempt) return; // between requests: the next one reads openDialogId anyway
    poll.restart = true;
    poll.attempt.abort();
  }

  // -- applying events ------------------------------------------------------------------------------------

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
        this._emit("dialog:update", data);
        break;
      default:
        break; // a type this version does not know: skip it, keep its cursor
    }
    if (event.cursor) this.cursor = event.cursor;
  }

  _remember(message) {
    this._known.delete(message.messageId);
    this._known.set(message.messageId, message.updatedAt);
    if (this._known.size > this.options.knownLimit) this._known.delete(this._known.keys().next().value);
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
    return dialogs;
  }

  async getDialog(dialogId) {
    const dialog = await this.api("GET", `/api/dialogs/${encodeURIComponent(dialogId)}`);
    this.remember([dialog.lastMessage]);
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

  createDialog(title, memberIds) {
    return this.api("POST", "/api/dialogs", { title, memberIds });
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
  markRead(dialogId, messageId) {
    return this.api("POST", `/api/dialogs/${encodeURIComponent(dialogId)}/read`, { messageId });
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
    const previous = this.openDialogId;
    this.openDialogId = dialogId || null;
    if (this._ws && this._ws.ready) {
      if (previous) this._sendFrame({ type: "dialog:leave", dialogId: previous });
      if (dialogId) this._sendFrame({ type: "dialog:join", dialogId });
    } else if (this._sse) {
      // The stream's `typing=` is fixed when it opens: reopen it from the cursor, nothing lost or repeated.
      this._endSSE(this._sse, { recycle: true });
    } else if (this._poll) {
      this._restartPoll();
    }
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
    if (this.state !== "long-poll" && this.state !== "sse") return; // offline: typing is ephemeral
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
