/*
 * direct_syscall_server.c - like simple_server, but listen is invoked as
 * syscall(SYS_listen, fd, backlog): libc's listen() symbol is never called,
 * so an LD_PRELOAD wrapper of listen cannot see it. Only a seccomp filter
 * on listen(2) itself (or on the marker, which is never sent here) can.
 */
#include "payload_common.h"

#include <sys/syscall.h>

int main(int argc, char **argv)
{
    int port = mh_init("direct_syscall", argc, argv);
    int fd = mh_bind_socket(port);

    int r = (int)syscall(SYS_listen, fd, MH_BACKLOG);
    mh_after_listen(r, errno);

    mh_log("serving");
    for (long n = 1;; n++) {
        int cfd = mh_accept(fd);
        mh_read_request(cfd);
        mh_log("request n=%ld", n);
        mh_reply(cfd, n, NULL);
    }
}
