/* Receivers in C for bench/loadgen.py: WebSocket subscribers and long-pollers that cost the generator little.
 *
 * The Python generator publishes and keeps the window; its own receivers cost more CPU per delivery than the
 * server does (a Python callback per frame), so on a machine whose cores the generator shares with the server
 * they, not the server, set the rate. These count the same things for far less: every event "~EVT<8 digits>"
 * each client gets (loss, duplicates), warm-up events "~WRM" (subscriptions in place) and each event's
 * completion (every client has it).
 *
 *   cc -O2 -o receivers receivers.c        (bench/loadgen.py builds it into bench/build/ on first use)
 *   receivers [pause-microseconds]          after each round of reads that found data, pause (default 0):
 *                                           frames gather in the socket buffers and one recv takes several,
 *                                           as a client that reads in batches; the server's sends are the same
 *
 * stdin, one line each: the clients, then commands.
 *   ws <port> <ready> <path>                 ready: 0 at the 101, 1 at a first frame {"type":"ready" or "reset"
 *   poll <port> <kind> <path> <auth|->       kind: ours (GET <path>?cursor=, Bearer <auth>), nchan (ETag)
 *   go                                       connect them all (at most 100 handshakes in flight)
 *   arm <events>                             count events 0..events-1 from now on
 *   end                                      print the result and exit
 * stdout: "connected <n>", "warmed <n>" as it grows, "done <completed>" as events complete, and at the end
 * "result <delivered> <duplicated> <lost> <errors> <answers>" then "error <text>" for the first errors.
 * Loopback only; each wait of the Python side is bounded, and this exits when stdin closes.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CONNECT_LIMIT 60

enum { WS, POLL_OURS, POLL_NCHAN };
enum { CONNECTING, HANDSHAKE, OPEN, CLOSED };

typedef struct {
    int fd, kind, ready_mode, state, warm, ready;
    char *path, *auth;
    char *buf;
    size_t len, cap;
    char cursor[256], etag[256], modified[256];
    unsigned char *counts;
} Client;

static Client *clients;
static int nclients, nready, nwarm, epfd, inflight;
static long delivered, duplicated, errors, answers;
static int events, expected, completed;
static int *per_event;
static char first_errors[5][200];

static void error_at(Client *c, const char *what) {
    if (errors < 5) snprintf(first_errors[errors], sizeof first_errors[0], "client %ld: %s", (long)(c - clients), what);
    errors++;
}

static void close_client(Client *c, const char *why) {
    if (c->state == CLOSED) return;
    if (why) error_at(c, why);
    if (!c->ready) { inflight--; c->ready = -1; }
    c->state = CLOSED;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
}

static void send_all(Client *c, const char *data, size_t n) {
    /* Requests and pongs are small: a loopback socket takes them whole, else the client has failed. */
    ssize_t sent = send(c->fd, data, n, MSG_NOSIGNAL);
    if (sent != (ssize_t)n) close_client(c, "a send did not go out whole");
}

static void record(Client *c, const char *data, size_t n) {
    const char *end = data + n, *at = data;
    while ((at = memmem(at, end - at, "~EVT", 4)) != NULL && at + 12 <= end) {
        long idx = 0;
        for (int i = 4; i < 12; i++) idx = idx * 10 + (at[i] - '0');
        at += 12;
        if (!c->counts) continue; /* before arm: a leftover of the warm-up */
        if (idx < 0 || idx >= events) { error_at(c, "an event outside the run"); continue; }
        if (c->counts[idx]) { duplicated++; continue; }
        c->counts[idx] = 1;
        delivered++;
        if (++per_event[idx] == expected) {
            completed++;
            printf("done %d\n", completed);
        }
    }
    if (!c->warm && memmem(data, n, "~WRM", 4)) {
        c->warm = 1;
        printf("warmed %d\n", ++nwarm);
    }
}

static void became_ready(Client *c) {
    if (c->ready) return;
    c->ready = 1;
    nready++;
    inflight--;
}

static void quote(const char *in, char *out, size_t cap) {
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    for (; *in && o + 4 < cap; in++) {
        unsigned char ch = (unsigned char)*in;
        if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || strchr("-._~", ch)) {
            out[o++] = ch;
        } else {
            out[o++] = '%'; out[o++] = hex[ch >> 4]; out[o++] = hex[ch & 15];
        }
    }
    out[o] = 0;
}

static void send_poll(Client *c) {
    char req[2048], q[800];
    int n;
    if (c->kind == POLL_OURS) {
        quote(c->cursor, q, sizeof q);
        n = snprintf(req, sizeof req, "GET %s%s%s HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer %s\r\n\r\n",
                     c->path, c->cursor[0] ? "?timeout=55&cursor=" : "", c->cursor[0] ? q : "", c->auth);
    } else {
        n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: bench\r\nIf-Modified-Since: %s\r\nIf-None-Match: %s\r\n\r\n",
                     c->path, c->modified, c->etag);
    }
    send_all(c, req, (size_t)n);
}

static void header_value(const char *head, size_t n, const char *name, char *out, size_t cap) {
    size_t len = strlen(name);
    const char *at = head, *end = head + n;
    while ((at = memmem(at, end - at, "\r\n", 2)) != NULL && at + 2 + len < end) {
        at += 2;
        if (strncasecmp(at, name, len) == 0 && at[len] == ':') {
            const char *v = at + len + 1, *e = memmem(v, end - v, "\r\n", 2);
            while (v < e && *v == ' ') v++;
            size_t m = (size_t)(e - v) < cap - 1 ? (size_t)(e - v) : cap - 1;
            memcpy(out, v, m);
            out[m] = 0;
            return;
        }
    }
}

/* Whole HTTP answers in the buffer: count, take the cursor or validators, ask again. */
static size_t on_poll_data(Client *c) {
    size_t used = 0;
    for (;;) {
        char *head = c->buf + used;
        size_t avail = c->len - used;
        char *sep = memmem(head, avail, "\r\n\r\n", 4);
        if (!sep) return used;
        size_t head_len = (size_t)(sep - head) + 4;
        char value[64] = "";
        header_value(head, head_len, "Content-Length", value, sizeof value);
        if (!value[0]) { close_client(c, "an answer without Content-Length"); return used; }
        size_t body_len = strtoul(value, NULL, 10);
        if (avail < head_len + body_len) return used;
        int status = atoi(head + 9);
        char *body = head + head_len;
        if (status == 200) {
            answers++;
            if (c->kind == POLL_OURS) {
                const char *at = NULL, *p = body, *end = body + body_len;
                while ((p = memmem(p, end - p, "\"cursor\":\"", 10)) != NULL) { at = p; p += 10; }
                if (!at) { close_client(c, "an answer without a cursor"); return used; }
                at += 10;
                const char *q = memchr(at, '"', end - at);
                size_t m = q && (size_t)(q - at) < sizeof c->cursor ? (size_t)(q - at) : 0;
                memcpy(c->cursor, at, m);
                c->cursor[m] = 0;
            } else {
                header_value(head, head_len, "Last-Modified", c->modified, sizeof c->modified);
                header_value(head, head_len, "Etag", c->etag, sizeof c->etag);
            }
            record(c, body, body_len);
            if (!c->ready) became_ready(c);
        } else if (!(c->kind == POLL_NCHAN && (status == 304 || status == 408))) {
            char why[80];
            snprintf(why, sizeof why, "a poll answered %d", status);
            close_client(c, why);
            return used;
        }
        used += head_len + body_len;
        send_poll(c);
        if (c->state == CLOSED) return used;
    }
}

/* Whole frames in the buffer (the server's are not masked). */
static size_t on_ws_data(Client *c) {
    size_t used = 0;
    if (c->state == HANDSHAKE) {
        char *sep = memmem(c->buf, c->len, "\r\n\r\n", 4);
        if (!sep) return 0;
        if (strncmp(c->buf, "HTTP/1.1 101", 12) != 0) { close_client(c, "the upgrade was refused"); return 0; }
        c->state = OPEN;
        used = (size_t)(sep - c->buf) + 4;
        if (!c->ready_mode) became_ready(c);
    }
    for (;;) {
        unsigned char *f = (unsigned char *)c->buf + used;
        size_t avail = c->len - used, head = 2;
        if (avail < 2) return used;
        int opcode = f[0] & 15;
        unsigned long long n = f[1] & 127;
        if (n == 126) { head = 4; if (avail < head) return used; n = ((size_t)f[2] << 8) | f[3]; }
        else if (n == 127) {
            head = 10; if (avail < head) return used;
            n = 0; for (int i = 2; i < 10; i++) n = (n << 8) | f[i];
        }
        if (avail < head + n) return used;
        char *payload = (char *)f + head;
        if (opcode == 1 || opcode == 2 || opcode == 0) {
            if (!c->ready && (n >= 15 && (memcmp(payload, "{\"type\":\"ready\"", 15) == 0 ||
                                          memcmp(payload, "{\"type\":\"reset\"", 15) == 0))) became_ready(c);
            record(c, payload, n);
        } else if (opcode == 9) { /* ping: a pong with the same payload, masked with a zero key */
            char pong[6 + 125];
            pong[0] = (char)0x8A; pong[1] = (char)(0x80 | n);
            memset(pong + 2, 0, 4);
            memcpy(pong + 6, payload, n);
            send_all(c, pong, 6 + n);
        } else if (opcode == 8) {
            close_client(c, "the server closed the WebSocket");
            return used;
        }
        used += head + n;
    }
}

static void on_readable(Client *c) {
    for (;;) {
        if (c->cap - c->len < 65536) {
            c->cap = c->cap * 2 + 65536;
            c->buf = realloc(c->buf, c->cap);
        }
        ssize_t got = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
        if (got == 0) { close_client(c, "the server closed the connection"); return; }
        if (got < 0) {
            if (errno == EAGAIN) return;
            close_client(c, strerror(errno));
            return;
        }
        c->len += (size_t)got;
        size_t used = c->kind == WS ? on_ws_data(c) : on_poll_data(c);
        if (c->state == CLOSED) return;
        memmove(c->buf, c->buf + used, c->len - used);
        c->len -= used;
        if ((size_t)got < 65536) return;
    }
}

static void start(Client *c, int port) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    inflight++;
    c->state = HANDSHAKE;
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) != 0) { close_client(c, "connect failed"); return; }
    fcntl(c->fd, F_SETFL, O_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    if (c->kind == WS) {
        char req[2048];
        int n = snprintf(req, sizeof req,
                         "GET %s HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", c->path);
        send_all(c, req, (size_t)n);
    } else {
        c->state = OPEN;
        send_poll(c);
    }
}

static int pause_us;

static void pump(int timeout_ms) {
    static struct epoll_event evs[8192];
    int n = epoll_wait(epfd, evs, 8192, timeout_ms), reads = 0;
    for (int i = 0; i < n; i++) {
        if (evs[i].data.ptr == NULL) continue;
        on_readable(evs[i].data.ptr);
        reads++;
    }
    fflush(stdout);
    if (reads && pause_us) usleep(pause_us);
}

static void command(char *line, int *ports) {
    if (strncmp(line, "go", 2) == 0) {
        /* A handshake not answered within CONNECT_LIMIT seconds fails its client: the wait has an end. */
        time_t deadline = time(NULL) + CONNECT_LIMIT;
        for (int i = 0; i < nclients; i++) {
            while (inflight >= 100) {
                if (time(NULL) > deadline) {
                    for (int j = 0; j < i; j++)
                        if (!clients[j].ready) close_client(&clients[j], "no answer to the handshake in time");
                }
                pump(100);
            }
            start(&clients[i], ports[i]);
        }
        printf("connected %d\n", nclients);
    } else if (strncmp(line, "arm ", 4) == 0) {
        events = atoi(line + 4);
        expected = 0;
        for (int i = 0; i < nclients; i++) {
            free(clients[i].counts);
            clients[i].counts = calloc(events, 1);
            if (clients[i].state != CLOSED) expected++;
        }
        free(per_event);
        per_event = calloc(events, sizeof *per_event);
        completed = 0;
        delivered = duplicated = answers = 0;
    } else if (strncmp(line, "end", 3) == 0) {
        long lost = 0;
        for (int i = 0; i < nclients; i++)
            if (clients[i].counts)
                for (int e = 0; e < events; e++) lost += !clients[i].counts[e];
        printf("result %ld %ld %ld %ld %ld\n", delivered, duplicated, lost, errors, answers);
        for (int i = 0; i < 5 && i < errors; i++) printf("error %s\n", first_errors[i]);
        fflush(stdout);
        exit(0);
    }
}

int main(int argc, char **argv) {
    pause_us = argc > 1 ? atoi(argv[1]) : 0;
    static char line[4096], lines_in[1 << 16];
    size_t pending = 0;
    int cap = 1024, *ports = malloc(cap * sizeof *ports);
    clients = calloc(cap, sizeof *clients);
    epfd = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    fcntl(0, F_SETFL, O_NONBLOCK);
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev);
    for (;;) {
        /* stdin: complete lines are commands or clients */
        ssize_t got = read(0, lines_in + pending, sizeof lines_in - pending - 1);
        if (got == 0) return 0;
        if (got > 0) pending += (size_t)got;
        char *nl;
        while ((nl = memchr(lines_in, '\n', pending)) != NULL) {
            size_t n = (size_t)(nl - lines_in);
            memcpy(line, lines_in, n < sizeof line - 1 ? n : sizeof line - 1);
            line[n < sizeof line - 1 ? n : sizeof line - 1] = 0;
            memmove(lines_in, nl + 1, pending - n - 1);
            pending -= n + 1;
            char kind[8], mode[8], path[2048], auth[1024] = "-";
            int port;
            if (sscanf(line, "ws %d %7s %2047s", &port, mode, path) == 3 ||
                sscanf(line, "poll %d %7s %2047s %1023s", &port, mode, path, auth) >= 3) {
                if (nclients == cap) {
                    cap *= 2;
                    clients = realloc(clients, cap * sizeof *clients);
                    ports = realloc(ports, cap * sizeof *ports);
                    memset(clients + nclients, 0, (cap - nclients) * sizeof *clients);
                }
                Client *c = &clients[nclients];
                sscanf(line, "%7s", kind);
                c->kind = kind[0] == 'w' ? WS : strcmp(mode, "ours") == 0 ? POLL_OURS : POLL_NCHAN;
                c->ready_mode = c->kind == WS && mode[0] == '1';
                c->path = strdup(path);
                c->auth = strdup(auth);
                ports[nclients++] = port;
            } else {
                command(line, ports);
            }
        }
        pump(nclients ? 50 : 100);
    }
}
