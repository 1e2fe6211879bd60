/*
 * mh_preload.c - LD_PRELOAD library for miehisto's NOTIFY stop backend.
 *
 * Wraps libc's listen, bind, accept, accept4 and connect. Each wrapper
 * passes straight through to the real function (dlsym RTLD_NEXT), except
 * that the FIRST call of the configured stop function first sends the
 * marker: a real-time signal set to SIG_IGN and sent to ourselves with
 * syscall(SYS_kill, getpid(), sig). The signal itself is a no-op; what
 * matters is the syscall, which miehisto's seccomp filter traps with
 * SCMP_ACT_NOTIFY (it matches kill(*, sig), hence SYS_kill rather than
 * raise()/tgkill). The supervisor then dumps the process, blocked right
 * before the stop function. After a CRIU restore the restored filter has
 * no listener and the marker fails with ENOSYS: that result is ignored,
 * the caller's errno is preserved and the real function runs normally.
 *
 * Environment (read at call time):
 *   MIEHISTO_STOP_AT        function to stop before (default "listen";
 *                           one of listen, bind, accept, accept4, connect)
 *   MIEHISTO_MARKER_SIG     marker signal number (default SIGRTMAX)
 *   MIEHISTO_PRELOAD_MODE   "marker" (default) or "sigstop": research row,
 *                           kill(getpid(), SIGSTOP) instead of the marker,
 *                           to show that PID 1 of a PID namespace ignores it;
 *                           or "trim": the TRACE backend's mode, no marker
 *                           and no line on stderr, only the malloc_trim(0)
 *                           below; the real call then enters the syscall
 *                           the TRACE filter stops at
 *   MIEHISTO_PRELOAD_QUIET  "1" silences the stderr line
 *   MIEHISTO_PRELOAD_TRIM   "0" keeps malloc's free memory (see below)
 *
 * Right before the marker, malloc_trim(0) hands malloc's free memory back
 * to the kernel: glibc shrinks each arena's top and madvise(MADV_DONTNEED)s
 * the whole free pages inside it. Those pages hold nothing the program can
 * reach, yet CRIU would dump them (they are present) and copy them back on
 * every restore; trimmed, they are neither in the image nor restored, and
 * the kernel supplies a fresh page when malloc reuses that memory. What the
 * program computes is unchanged. malloc_trim is glibc's: it is looked up at
 * run time (dlsym), so that the library still loads into a program whose
 * libc has none (musl); there the trim is skipped.
 *
 * When the stop fires, one line goes to stderr (fd 2, write(2), no stdio):
 *   miehisto-preload: marker sig=N before listen ret=R errno=E
 *   miehisto-preload: sigstop sig=19 before listen ret=R errno=E
 * R/E are the marker's own result (0/0 without a filter, -1/ENOSYS=38 after
 * a restore). In sigstop mode the line is written once kill() returns, i.e.
 * after the process was continued - or at once if the SIGSTOP was ignored.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

/* glibc declares the sockaddr arguments through these macros (a transparent
 * union in GNU C); other libcs use plain pointers. */
#ifndef __SOCKADDR_ARG
#define __SOCKADDR_ARG struct sockaddr *__restrict
#endif
#ifndef __CONST_SOCKADDR_ARG
#define __CONST_SOCKADDR_ARG const struct sockaddr *
#endif

/* Process-wide "the stop already fired" flag, set before the marker. */
static atomic_int stop_fired;

static int quiet(void)
{
    const char *q = getenv("MIEHISTO_PRELOAD_QUIET");
    return q && strcmp(q, "1") == 0;
}

static void say(const char *msg)
{
    size_t len = strlen(msg);
    while (len > 0) {
        ssize_t n = write(STDERR_FILENO, msg, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        msg += n;
        len -= (size_t)n;
    }
}

/* Resolve the next definition of `name` (libc's), caching it. A benign
 * race: every thread resolves the same address. */
static void *real_fn(void **cache, const char *name)
{
    void *fn = __atomic_load_n(cache, __ATOMIC_ACQUIRE);
    if (!fn) {
        int saved_errno = errno;    /* dlsym may clobber it */
        fn = dlsym(RTLD_NEXT, name);
        errno = saved_errno;
        if (!fn) {
            char msg[160];
            snprintf(msg, sizeof msg,
                     "miehisto-preload: dlsym(RTLD_NEXT, %s) failed\n", name);
            say(msg);
            return NULL;
        }
        __atomic_store_n(cache, fn, __ATOMIC_RELEASE);
    }
    return fn;
}

/* Hands malloc's free memory back (see the top of this file). */
static void trim_heap(void)
{
    const char *trim = getenv("MIEHISTO_PRELOAD_TRIM");
    if (trim && strcmp(trim, "0") == 0)
        return;
    int saved_errno = errno;
    int (*f)(size_t) = (int (*)(size_t))dlsym(RTLD_DEFAULT, "malloc_trim");
    if (f)
        (void)f(0);
    errno = saved_errno;
}

static int marker_signal(void)
{
    int sig = SIGRTMAX;         /* a libc function call, not a constant */
    const char *s = getenv("MIEHISTO_MARKER_SIG");
    if (s && *s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (*end == '\0' && v > 0 && v < NSIG)
            sig = (int)v;
    }
    return sig;
}

/* Called at the top of every wrapper: fires the stop before the first call
 * of the configured function, and does nothing otherwise. errno as seen by
 * the caller is preserved. */
static void maybe_stop(const char *fn)
{
    if (atomic_load(&stop_fired))
        return;
    const char *want = getenv("MIEHISTO_STOP_AT");
    if (!want || !*want)
        want = "listen";
    if (strcmp(want, fn) != 0)
        return;
    if (atomic_exchange(&stop_fired, 1))
        return;                 /* another thread won the race */

    int saved_errno = errno;
    const char *mode = getenv("MIEHISTO_PRELOAD_MODE");
    if (mode && strcmp(mode, "trim") == 0) {
        trim_heap();
        errno = saved_errno;
        return;
    }
    int sigstop = mode && strcmp(mode, "sigstop") == 0;
    int sig;
    long ret;

    if (sigstop) {
        sig = SIGSTOP;
        ret = kill(getpid(), SIGSTOP);
    } else {
        sig = marker_signal();
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = SIG_IGN;
        sigemptyset(&sa.sa_mask);
        (void)sigaction(sig, &sa, NULL);
        trim_heap();
        /* The marker: trapped by the seccomp NOTIFY filter. Its result is
         * deliberately ignored (ENOSYS after a restore). */
        ret = syscall(SYS_kill, (long)getpid(), (long)sig);
    }
    int err = ret < 0 ? errno : 0;

    if (!quiet()) {
        char msg[160];
        snprintf(msg, sizeof msg,
                 "miehisto-preload: %s sig=%d before %s ret=%ld errno=%d\n",
                 sigstop ? "sigstop" : "marker", sig, fn, ret, err);
        say(msg);
    }
    errno = saved_errno;
}

int listen(int fd, int backlog)
{
    static void *real;
    maybe_stop("listen");
    int (*f)(int, int) = (int (*)(int, int))real_fn(&real, "listen");
    if (!f) {
        errno = ENOSYS;
        return -1;
    }
    return f(fd, backlog);
}

int bind(int fd, __CONST_SOCKADDR_ARG addr, socklen_t len)
{
    static void *real;
    maybe_stop("bind");
    int (*f)(int, __CONST_SOCKADDR_ARG, socklen_t) =
        (int (*)(int, __CONST_SOCKADDR_ARG, socklen_t))real_fn(&real, "bind");
    if (!f) {
        errno = ENOSYS;
        return -1;
    }
    return f(fd, addr, len);
}

int connect(int fd, __CONST_SOCKADDR_ARG addr, socklen_t len)
{
    static void *real;
    maybe_stop("connect");
    int (*f)(int, __CONST_SOCKADDR_ARG, socklen_t) =
        (int (*)(int, __CONST_SOCKADDR_ARG, socklen_t))real_fn(&real, "connect");
    if (!f) {
        errno = ENOSYS;
        return -1;
    }
    return f(fd, addr, len);
}

int accept(int fd, __SOCKADDR_ARG addr, socklen_t *__restrict len)
{
    static void *real;
    maybe_stop("accept");
    int (*f)(int, __SOCKADDR_ARG, socklen_t *__restrict) =
        (int (*)(int, __SOCKADDR_ARG, socklen_t *__restrict))real_fn(&real, "accept");
    if (!f) {
        errno = ENOSYS;
        return -1;
    }
    return f(fd, addr, len);
}

int accept4(int fd, __SOCKADDR_ARG addr, socklen_t *__restrict len, int flags)
{
    static void *real;
    maybe_stop("accept4");
    int (*f)(int, __SOCKADDR_ARG, socklen_t *__restrict, int) =
        (int (*)(int, __SOCKADDR_ARG, socklen_t *__restrict, int))real_fn(&real, "accept4");
    if (!f) {
        errno = ENOSYS;
        return -1;
    }
    return f(fd, addr, len, flags);
}
