/*
 * forking_server.c - two-process payload: before socket/bind/listen the
 * server forks a helper child. Per request the parent sends one byte over a
 * pipe; the helper counts the bytes and answers with its running count
 * (a 4-byte int over a second pipe), which goes into the reply body as
 * "helper=<n>". So a restored tree is only correct if BOTH processes and
 * the pipes between them came back.
 *
 * The helper dies with the parent (PR_SET_PDEATHSIG) and logs nothing but
 * its own "helper start" / "helper exit" lines (never bound/listen lines).
 */
#include "payload_common.h"

#include <fcntl.h>
#include <stdint.h>
#include <sys/prctl.h>

static void helper_main(int req_fd, int resp_fd, pid_t parent)
{
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
        mh_die("prctl", 3);
    if (getppid() != parent)    /* parent already gone before prctl */
        _exit(0);
    signal(SIGTERM, SIG_DFL);   /* the "exit signal=" log is the parent's */
    signal(SIGINT, SIG_DFL);
    mh_log("helper start pid=%d ppid=%d", (int)getpid(), (int)getppid());

    int32_t count = 0;
    for (;;) {
        char c;
        ssize_t n = read(req_fd, &c, 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;              /* EOF: the parent closed its end */
        count++;
        if (mh_write_all(resp_fd, (const char *)&count, sizeof count) < 0)
            break;
    }
    mh_log("helper exit count=%d", (int)count);
    _exit(0);
}

/* Ask the helper for the next count; -1 if it does not answer. */
static int32_t helper_count(int req_fd, int resp_fd)
{
    int32_t count;
    char *p = (char *)&count;
    size_t got = 0;
    if (mh_write_all(req_fd, "+", 1) < 0)
        return -1;
    while (got < sizeof count) {
        ssize_t n = read(resp_fd, p + got, sizeof count - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        got += (size_t)n;
    }
    return count;
}

int main(int argc, char **argv)
{
    int port = mh_init("forking", argc, argv);

    int to_helper[2], from_helper[2];
    if (pipe2(to_helper, O_CLOEXEC) < 0 || pipe2(from_helper, O_CLOEXEC) < 0)
        mh_die("pipe", 3);

    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0)
        mh_die("fork", 3);
    if (child == 0) {
        close(to_helper[1]);
        close(from_helper[0]);
        helper_main(to_helper[0], from_helper[1], parent);
    }
    close(to_helper[0]);
    close(from_helper[1]);
    mh_log("child pid=%d", (int)child);

    int fd = mh_bind_socket(port);
    int r = listen(fd, MH_BACKLOG);
    mh_after_listen(r, errno);

    mh_log("serving");
    for (long n = 1;; n++) {
        int cfd = mh_accept(fd);
        mh_read_request(cfd);
        int32_t h = helper_count(to_helper[1], from_helper[0]);
        mh_log("request n=%ld", n);
        char extra[32];
        snprintf(extra, sizeof extra, " helper=%d", (int)h);
        mh_reply(cfd, n, extra);
    }
}
