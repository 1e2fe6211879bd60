/*
 * simple_server.c - single-threaded payload: socket, bind, libc listen(),
 * then a sequential accept loop.
 *
 * Built twice by build.rs: dynamically (`simple_server`, log name "simple")
 * where an LD_PRELOAD wrapper of listen() works, and with -static
 * (`simple_server_static`, log name "simple_static", compiled with
 * -DMH_STATIC_BUILD) where LD_PRELOAD has no effect at all.
 *
 * MH_FREED_HEAP_MIB=N: before listen, fill N MiB of malloc's heap with
 * small blocks, keep one block allocated above them and free the rest, so
 * the heap holds N MiB of touched but free memory that free() cannot give
 * back (it is not at the heap's top): what malloc_trim(0) before the stop
 * hands back, and what an image dumped without it carries.
 */
#include "payload_common.h"

#ifdef MH_STATIC_BUILD
#define MH_NAME "simple_static"
#else
#define MH_NAME "simple"
#endif

/* Blocks below glibc's mmap threshold, so they come from the heap. */
#define MH_BLOCK 4000

static void leave_freed_heap(void)
{
    const char *s = getenv("MH_FREED_HEAP_MIB");
    long mib = s ? strtol(s, NULL, 10) : 0;
    if (mib <= 0)
        return;
    size_t n = (size_t)mib * (1u << 20) / MH_BLOCK;
    char **blocks = calloc(n, sizeof *blocks);
    if (!blocks)
        mh_die("calloc", 3);
    for (size_t i = 0; i < n; i++) {
        blocks[i] = malloc(MH_BLOCK);
        if (!blocks[i])
            mh_die("malloc", 3);
        memset(blocks[i], 0x5a, MH_BLOCK);
    }
    /* Kept for good: pins the heap's top above the freed blocks. */
    char *pin = malloc(64);
    if (!pin)
        mh_die("malloc", 3);
    memset(pin, 1, 64);
    for (size_t i = 0; i < n; i++)
        free(blocks[i]);
    free(blocks);
    mh_log("freed heap mib=%ld pin=%p", mib, (void *)pin);
}

int main(int argc, char **argv)
{
    int port = mh_init(MH_NAME, argc, argv);
    leave_freed_heap();
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
