/*
 * payload_common.h - shared helpers for the miehisto C test payloads.
 *
 * Every payload is a tiny HTTP/1.0 server on 127.0.0.1 that logs what it
 * does to stdout, one line per event, in a machine-parseable format:
 *
 *   MHLOG <name> start pid=<pid> ppid=<ppid>
 *   MHLOG <name> bound port=<port> fd=<fd>
 *   MHLOG <name> listen ret=<r> errno=<e>
 *   MHLOG <name> fatal listen failed            (then exit(3))
 *   MHLOG <name> serving
 *   MHLOG <name> request n=<count>
 *   MHLOG <name> exit signal=<sig>               (on SIGTERM/SIGINT)
 *
 * Lines are written with one write(2) each (no stdio buffering), so they
 * reach a log file immediately and are never duplicated by fork().
 *
 * Header-only: every function is static; each payload includes it once.
 */
#ifndef MH_PAYLOAD_COMMON_H
#define MH_PAYLOAD_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <unistd.h>

/* Not every payload uses every helper: no -Wunused-function for them. */
#define MH_UNUSED __attribute__((unused))

#define MH_DEFAULT_PORT 8080
#define MH_BACKLOG 64

static const char *mh_name = "payload";

/* Write the whole buffer, retrying on EINTR and short writes. */
static MH_UNUSED int mh_write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Log one line "MHLOG <name> <formatted text>\n" to stdout with one write(2).
 * errno is preserved so callers can log and then still inspect it. */
__attribute__((format(printf, 1, 2)))
static MH_UNUSED void mh_log(const char *fmt, ...)
{
    char line[512];
    int saved = errno;
    int n = snprintf(line, sizeof line, "MHLOG %s ", mh_name);
    if (n < 0 || (size_t)n >= sizeof line)
        n = 0;
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        m = 0;
    size_t len = (size_t)n + (size_t)m;
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    line[len++] = '\n';
    (void)mh_write_all(STDOUT_FILENO, line, len);
    errno = saved;
}

static MH_UNUSED void mh_die(const char *what, int code)
{
    mh_log("fatal %s failed errno=%d (%s)", what, errno, strerror(errno));
    exit(code);
}

/* Port from "--port N" / "--port=N", else env PORT, else 8080. */
static MH_UNUSED int mh_parse_port(int argc, char **argv)
{
    const char *s = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--port") == 0 && i + 1 < argc)
            s = argv[++i];
        else if (strncmp(argv[i], "--port=", 7) == 0)
            s = argv[i] + 7;
    }
    if (!s)
        s = getenv("PORT");
    if (!s || !*s)
        return MH_DEFAULT_PORT;
    char *end;
    long p = strtol(s, &end, 10);
    if (*end != '\0' || p < 0 || p > 65535) {
        mh_log("fatal bad port '%s'", s);
        exit(2);
    }
    return (int)p;
}

/* SIGTERM/SIGINT handler: log "exit signal=N" and _exit(128+N).
 * Needed because as PID 1 of a PID namespace a process ignores every
 * signal left at SIG_DFL (except SIGKILL/SIGSTOP from an ancestor). Only
 * async-signal-safe calls here. */
static MH_UNUSED void mh_on_term(int sig)
{
    char line[128] = "MHLOG ";
    size_t len = strlen(line);
    for (const char *p = mh_name; *p && len < 100; p++)
        line[len++] = *p;
    const char *mid = " exit signal=";
    for (const char *p = mid; *p; p++)
        line[len++] = *p;
    if (sig >= 10)
        line[len++] = (char)('0' + sig / 10 % 10);
    line[len++] = (char)('0' + sig % 10);
    line[len++] = '\n';
    (void)mh_write_all(STDOUT_FILENO, line, len);
    _exit(128 + sig);
}

/* Common start: set the log name, ignore SIGPIPE (a client that hangs up
 * must not kill the server), exit cleanly on SIGTERM/SIGINT (even as
 * PID 1), log "start", return the port to use. */
static MH_UNUSED int mh_init(const char *name, int argc, char **argv)
{
    mh_name = name;
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = mh_on_term;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    mh_log("start pid=%d ppid=%d", (int)getpid(), (int)getppid());
    return mh_parse_port(argc, argv);
}

/* socket + SO_REUSEADDR + bind to 127.0.0.1:port; logs "bound" with the
 * actual port (so --port 0 works). Does NOT listen: each payload calls
 * listen its own way and then mh_after_listen(). */
static MH_UNUSED int mh_bind_socket(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        mh_die("socket", 3);
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
        mh_die("setsockopt", 3);

    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        mh_die("bind", 3);

    socklen_t len = sizeof sa;
    if (getsockname(fd, (struct sockaddr *)&sa, &len) == 0)
        port = ntohs(sa.sin_port);
    mh_log("bound port=%d fd=%d", port, fd);
    return fd;
}

/* Log the result of listen; on failure log "fatal listen failed", exit(3).
 * `ret` is listen's return value, `err` the errno right after the call. */
static MH_UNUSED void mh_after_listen(int ret, int err)
{
    mh_log("listen ret=%d errno=%d", ret, ret == 0 ? 0 : err);
    if (ret != 0) {
        mh_log("fatal listen failed");
        exit(3);
    }
}

/* Read the request: up to the blank line ending the headers, EOF, a full
 * buffer, or a 5 s timeout - whichever comes first. The request itself is
 * not parsed: every path (including /health) gets the same 200 reply. */
static MH_UNUSED void mh_read_request(int cfd)
{
    char buf[4096];
    size_t used = 0;
    struct timeval tv = { .tv_sec = 5, .tv_usec = 0 };
    (void)setsockopt(cfd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    while (used < sizeof buf - 1) {
        ssize_t n = read(cfd, buf + used, sizeof buf - 1 - used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        used += (size_t)n;
        buf[used] = '\0';
        if (strstr(buf, "\r\n\r\n") || strstr(buf, "\n\n"))
            break;
    }
}

/* Send "HTTP/1.0 200 OK" with a text/plain body
 * "payload=<name> pid=<pid> requests=<n><extra>\n" and close the socket.
 * `extra` (may be NULL) is appended to the body line, e.g. " helper=3". */
static MH_UNUSED void mh_reply(int cfd, long requests, const char *extra)
{
    char body[256], msg[512];
    int blen = snprintf(body, sizeof body, "payload=%s pid=%d requests=%ld%s\n",
                        mh_name, (int)getpid(), requests, extra ? extra : "");
    if (blen < 0 || (size_t)blen >= sizeof body)
        blen = (int)strlen(body);
    int mlen = snprintf(msg, sizeof msg,
                        "HTTP/1.0 200 OK\r\n"
                        "Content-Type: text/plain\r\n"
                        "Content-Length: %d\r\n"
                        "Connection: close\r\n"
                        "\r\n%s",
                        blen, body);
    if (mlen > 0 && (size_t)mlen < sizeof msg)
        (void)mh_write_all(cfd, msg, (size_t)mlen);
    close(cfd);
}

/* accept(2) retrying on EINTR / transient errors; returns a client fd. */
static MH_UNUSED int mh_accept(int lfd)
{
    for (;;) {
        int cfd = accept(lfd, NULL, NULL);
        if (cfd >= 0)
            return cfd;
        if (errno == EINTR || errno == ECONNABORTED)
            continue;
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
            errno == ENOMEM) {
            usleep(10000); /* transient resource shortage: back off */
            continue;
        }
        mh_die("accept", 4);
    }
}

#endif /* MH_PAYLOAD_COMMON_H */
