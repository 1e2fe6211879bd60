/*
 * threaded_server.c - multi-threaded payload: 4 worker threads are started
 * BEFORE listen(). They block on a condition variable until the main thread
 * has called listen() and published the listening fd; then each runs its
 * own accept loop on that fd and the main thread just waits.
 *
 * Research question: how does a process with several threads stop (and
 * dump/restore) at the first listen? At that moment the workers sit in
 * futex waits while the main thread is in listen (or in the marker).
 */
#include "payload_common.h"

#include <pthread.h>
#include <stdatomic.h>

#define NTHREADS 4

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ready = PTHREAD_COND_INITIALIZER;
static int listen_fd = -1;          /* protected by lock */
static atomic_long requests;        /* shared request counter */

static void *worker(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&lock);
    while (listen_fd < 0)
        pthread_cond_wait(&ready, &lock);
    int fd = listen_fd;
    pthread_mutex_unlock(&lock);

    for (;;) {
        int cfd = mh_accept(fd);
        mh_read_request(cfd);
        long n = atomic_fetch_add(&requests, 1) + 1;
        mh_log("request n=%ld", n);
        mh_reply(cfd, n, NULL);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int port = mh_init("threaded", argc, argv);

    pthread_t tids[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) {
        int e = pthread_create(&tids[i], NULL, worker, NULL);
        if (e != 0) {
            errno = e;
            mh_die("pthread_create", 3);
        }
    }
    mh_log("threads=%d", NTHREADS);

    int fd = mh_bind_socket(port);
    int r = listen(fd, MH_BACKLOG);
    mh_after_listen(r, errno);

    mh_log("serving");
    pthread_mutex_lock(&lock);
    listen_fd = fd;
    pthread_cond_broadcast(&ready);
    pthread_mutex_unlock(&lock);

    for (int i = 0; i < NTHREADS; i++)
        pthread_join(tids[i], NULL);
    return 0;
}
