/*
 * simple_server.c - single-threaded payload: socket, bind, libc listen(),
 * then a sequential accept loop.
 *
 * Built twice by build.rs: dynamically (`simple_server`, log name "simple")
 * where an LD_PRELOAD wrapper of listen() works, and with -static
 * (`simple_server_static`, log name "simple_static", compiled with
 * -DMH_STATIC_BUILD) where LD_PRELOAD has no effect at all.
 */
#include "payload_common.h"

#ifdef MH_STATIC_BUILD
#define MH_NAME "simple_static"
#else
#define MH_NAME "simple"
#endif

int main(int argc, char **argv)
{
    int port = mh_init(MH_NAME, argc, argv);
    int fd = mh_bind_socket(port);

    int r = listen(fd, MH_BACKLOG);
    mh_after_listen(r, errno);

    mh_log("serving");
    for (long n = 1;; n++) {
        int cfd = mh_accept(fd);
        mh_read_request(cfd);
        mh_log("request n=%ld", n);
        mh_reply(cfd, n, NULL);
    }
}
