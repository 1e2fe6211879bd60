/*
 * handoff-supervisor: the talk's 2018 flow, plus the CRIU seize hand-off.
 *
 * 2018: fork a child, PTRACE_ATTACH it, set PTRACE_O_TRACESECCOMP, let it
 * load a seccomp filter returning SECCOMP_RET_TRACE for one syscall
 * (listen by default) and exec the service; when the service calls it, the
 * tracer gets PTRACE_EVENT_SECCOMP and holds the task there. An unpatched
 * `criu dump` of that task fails: the tracer holds it, and ptrace allows
 * one tracer per task.
 *
 * Hand-off: the supervisor listens on a UNIX socket. A CRIU with the
 * seize-patch (`criu dump --seize-handoff SOCKET`) connects right before
 * it seizes and sends "HANDOFF <pid>". The supervisor parks every thread it
 * holds (syscall skipped, rip back on the syscall instruction, rax = the
 * syscall number: it runs again when the task next runs), queues SIGSTOP,
 * detaches, and answers "RELEASED <tid> <nr>" per parked thread and
 * "READY". CRIU then seizes a quiet, untraced, group-stopped tree. When
 * CRIU has let go it sends "DONE <ok|fail> <killed|left>"; unless the
 * tasks were killed (a plain successful dump), or if the connection closes
 * without DONE, the supervisor takes the tree back with PTRACE_SEIZE and
 * resumes it: the parked syscall traps again, and is let through
 * (--after-dump release, default) or held again (--after-dump hold).
 *
 * The service runs in a sandbox like runmh's (new PID and mount
 * namespaces, a non-recursive bind of / with /dev, /dev/pts, /dev/shm,
 * /dev/mqueue and /sys bound one by one, pivot_root, a fresh /proc,
 * setsid, stdin from /dev/null, stdout/stderr appended to log files, no
 * other fds), so CRIU can dump and restore it with the same --external
 * mappings runmh uses. --no-sandbox runs it as a plain process.
 *
 * Status lines on stdout, one per event, for scripts:
 *   MHSUP started pid=<host pid> externals=<path:key,...>
 *   MHSUP held pid=<pid> tid=<tid> nr=<nr> ms=<ms since start>
 *   MHSUP handoff pid=<pid> released=<n>
 *   MHSUP done result=<ok|fail|gone> state=<killed|left|unknown>
 *   MHSUP retaken pid=<pid> threads=<n>
 *   MHSUP let-through tid=<tid> nr=<nr>
 *   MHSUP exit pid=<pid> status=<code> | signal=<sig>
 * Errors: one line on stderr, "handoff-supervisor: error: ...", exit 1.
 *
 * x86_64 only (the rewind edits rip/rax/orig_rax).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>

#ifndef __x86_64__
#error "handoff-supervisor rewinds x86_64 registers; other architectures are not supported"
#endif

#define PROG "handoff-supervisor"
#define MAX_TASKS 1024
#define TRACE_OPTIONS                                                                                \
	(PTRACE_O_TRACESECCOMP | PTRACE_O_TRACECLONE | PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK |    \
	 PTRACE_O_TRACEEXEC | PTRACE_O_EXITKILL)

enum after_dump { AFTER_RELEASE, AFTER_HOLD };

struct task {
	pid_t tid;
	bool used;
	bool started; /* its first (attach) stop was swallowed */
	bool held;    /* sitting in PTRACE_EVENT_SECCOMP, not resumed */
	long nr;      /* the held syscall */
};

static struct {
	const char *socket_path;
	const char *root;
	const char *log_dir;
	const char *pidfile;
	long stop_nr;
	bool seize;
	bool sandbox;
	enum after_dump after;
	char **argv;
} cfg = { .stop_nr = __NR_listen, .sandbox = true, .after = AFTER_RELEASE };

static struct task tasks[MAX_TASKS];
static pid_t root_pid;
/* The processes of the tree at the last hand-off: what to take back. */
static pid_t tree_procs[MAX_TASKS];
static int nr_tree_procs;
static bool dumped; /* a hand-off happened: later traps are let through (release) */
static struct timespec t0;

static void die(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, PROG ": error: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	if (root_pid > 0) {
		kill(root_pid, SIGKILL);
		unlink(cfg.socket_path);
	}
	exit(1);
}

static void status(const char *fmt, ...)
{
	va_list ap;

	printf("MHSUP ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

static void note(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, PROG ": ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static long ms_since_start(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000;
}

/* ------------------------------------------------------------ tasks -- */

static struct task *task_find(pid_t tid)
{
	for (int i = 0; i < MAX_TASKS; i++)
		if (tasks[i].used && tasks[i].tid == tid)
			return &tasks[i];
	return NULL;
}

static struct task *task_add(pid_t tid, bool started)
{
	struct task *t = task_find(tid);

	if (t)
		return t;
	for (int i = 0; i < MAX_TASKS; i++) {
		if (!tasks[i].used) {
			tasks[i] = (struct task){ .tid = tid, .used = true, .started = started };
			return &tasks[i];
		}
	}
	die("more than %d traced tasks", MAX_TASKS);
	return NULL;
}

static void task_del(pid_t tid)
{
	struct task *t = task_find(tid);

	if (t)
		t->used = false;
}

/* The thread group (process) a tid belongs to, from /proc. */
static pid_t tgid_of(pid_t tid)
{
	char path[64], line[256];
	FILE *f;
	pid_t tgid = -1;

	snprintf(path, sizeof(path), "/proc/%d/status", tid);
	f = fopen(path, "re");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "Tgid: %d", &tgid) == 1)
			break;
	fclose(f);
	return tgid;
}

static char proc_state(pid_t tid)
{
	char path[64], buf[512], *p;
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/stat", tid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return '?';
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return '?';
	buf[n] = '\0';
	p = strrchr(buf, ')');
	return (p && p[1] == ' ') ? p[2] : '?';
}

/* ----------------------------------------------------------- sandbox -- */

static const char *special_mounts[][2] = {
	{ "/dev", "dev" }, { "/dev/pts", "devpts" }, { "/dev/shm", "devshm" }, { "/dev/mqueue", "devmqueue" }, { "/sys", "sys" },
};
#define NR_SPECIAL (sizeof(special_mounts) / sizeof(special_mounts[0]))
static bool special_present[NR_SPECIAL];

static void find_special_mounts(void)
{
	char line[4096], mp[4096];
	FILE *f = fopen("/proc/self/mountinfo", "re");

	if (!f)
		die("cannot read /proc/self/mountinfo: %s", strerror(errno));
	while (fgets(line, sizeof(line), f)) {
		/* fields: id parent major:minor root mountpoint ... */
		if (sscanf(line, "%*s %*s %*s %*s %4095s", mp) != 1)
			continue;
		for (size_t i = 0; i < NR_SPECIAL; i++)
			if (!strcmp(mp, special_mounts[i][0]))
				special_present[i] = true;
	}
	fclose(f);
}

/* In the child: a failing step reports itself through the error pipe. */
static int child_err_fd = -1;

static void child_fail(const char *what)
{
	char msg[512];
	int e = errno;
	int n = snprintf(msg, sizeof(msg), "%s: %s", what, strerror(e));

	if (write(child_err_fd, msg, n) < 0)
		_exit(127);
	_exit(127);
}

static void install_filter(void)
{
	struct sock_filter insns[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 3),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned int)cfg.stop_nr, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRACE | ((unsigned int)cfg.stop_nr & SECCOMP_RET_DATA)),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { .len = sizeof(insns) / sizeof(insns[0]), .filter = insns };

	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		child_fail("prctl(PR_SET_NO_NEW_PRIVS)");
	if (syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog))
		child_fail("seccomp(SECCOMP_SET_MODE_FILTER)");
}

static void child_sandbox(void)
{
	char path[4096];

	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL))
		child_fail("make / private");
	/* Non-recursive: a copy of the whole tree makes criu dump fail. */
	if (mount("/", cfg.root, NULL, MS_BIND, NULL))
		child_fail("bind / onto the sandbox root");
	for (size_t i = 0; i < NR_SPECIAL; i++) {
		if (!special_present[i])
			continue;
		snprintf(path, sizeof(path), "%s%s", cfg.root, special_mounts[i][0]);
		if (mount(special_mounts[i][0], path, NULL, MS_BIND, NULL))
			child_fail("bind a special mount");
	}
	if (chdir(cfg.root))
		child_fail("chdir to the sandbox root");
	if (syscall(SYS_pivot_root, ".", "."))
		child_fail("pivot_root");
	if (umount2(".", MNT_DETACH))
		child_fail("detach the old root");
	if (chdir("/"))
		child_fail("chdir /");
	if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL))
		child_fail("mount /proc");
}

static void child_stdio(void)
{
	char path[4096];
	int fd;

	fd = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (fd < 0 || dup2(fd, 0) < 0)
		child_fail("stdin from /dev/null");
	close(fd);
	/* O_APPEND: a restored writer keeps appending where it was. */
	snprintf(path, sizeof(path), "%s/stdout.log", cfg.log_dir);
	fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
	if (fd < 0 || dup2(fd, 1) < 0)
		child_fail("open stdout.log");
	close(fd);
	snprintf(path, sizeof(path), "%s/stderr.log", cfg.log_dir);
	fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
	if (fd < 0 || dup2(fd, 2) < 0)
		child_fail("open stderr.log");
	close(fd);
}

static int child_main(int go_fd, int err_fd)
{
	sigset_t none;
	char c;

	child_err_fd = err_fd;
	/* A blocked mask survives execve: the service must get its signals. */
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	/* Wait until the parent is our tracer: the filter needs one. */
	if (read(go_fd, &c, 1) != 1)
		child_fail("wait for the tracer");
	close(go_fd);
	if (cfg.sandbox)
		child_sandbox();
	/* CRIU needs the dumped tree's root to lead its session. */
	if (setsid() < 0)
		child_fail("setsid");
	child_stdio();
	/* A stray fd (one on the host's /dev, say) makes criu dump fail. */
	if ((err_fd > 3 && syscall(SYS_close_range, 3, err_fd - 1, 0)) || syscall(SYS_close_range, err_fd + 1, ~0U, 0))
		child_fail("close inherited fds");
	install_filter();
	execvp(cfg.argv[0], cfg.argv);
	child_fail("exec the service");
	return 127;
}

/* ------------------------------------------------------------ ptrace -- */

static void xptrace(enum __ptrace_request req, pid_t tid, void *addr, void *data, const char *what)
{
	if (ptrace(req, tid, addr, data) < 0)
		die("%s of %d failed: %s", what, tid, strerror(errno));
}

/* Resume a stopped tracee, passing on a signal (0 for none). */
static void resume(pid_t tid, int sig)
{
	if (ptrace(PTRACE_CONT, tid, NULL, (void *)(long)sig) < 0 && errno != ESRCH)
		die("PTRACE_CONT of %d failed: %s", tid, strerror(errno));
}

/*
 * Park a thread held at PTRACE_EVENT_SECCOMP: skip the call now
 * (orig_rax = -1) and make it run again later (rip back on the 2-byte
 * syscall instruction, rax = its number). Only a tracer, in this stop, can
 * do this: once the thread leaves the stop the call has run or is gone.
 */
static void park(struct task *t)
{
	struct user_regs_struct r;
	long text;

	xptrace(PTRACE_GETREGS, t->tid, NULL, &r, "PTRACE_GETREGS");
	errno = 0;
	text = ptrace(PTRACE_PEEKTEXT, t->tid, (void *)(r.rip - 2), NULL);
	if (errno)
		die("cannot read the code of %d at %#llx: %s", t->tid, r.rip - 2, strerror(errno));
	if ((text & 0xffff) != 0x050f)
		die("%d did not enter its syscall through a syscall instruction (bytes %02lx %02lx before rip %#llx)",
		    t->tid, text & 0xff, (text >> 8) & 0xff, r.rip);
	r.rax = r.orig_rax;
	r.rip -= 2;
	r.orig_rax = (unsigned long long)-1;
	xptrace(PTRACE_SETREGS, t->tid, NULL, &r, "PTRACE_SETREGS");
}

static void on_seccomp_stop(struct task *t)
{
	struct user_regs_struct r;

	xptrace(PTRACE_GETREGS, t->tid, NULL, &r, "PTRACE_GETREGS");
	if (dumped && cfg.after == AFTER_RELEASE) {
		status("let-through tid=%d nr=%lld", t->tid, r.orig_rax);
		resume(t->tid, 0);
		return;
	}
	t->held = true;
	t->nr = (long)r.orig_rax;
	status("held pid=%d tid=%d nr=%ld ms=%ld", tgid_of(t->tid), t->tid, t->nr, ms_since_start());
}

static void handle_exit(pid_t tid, int st)
{
	task_del(tid);
	if (tid != root_pid)
		return;
	unlink(cfg.socket_path);
	if (WIFEXITED(st))
		status("exit pid=%d status=%d", tid, WEXITSTATUS(st));
	else
		status("exit pid=%d signal=%d", tid, WTERMSIG(st));
	exit(0);
}

/* One wait status of a traced (or formerly traced) task. */
static void handle_wait(pid_t tid, int st)
{
	struct task *t;
	int event = st >> 16;
	unsigned long msg;

	if (WIFEXITED(st) || WIFSIGNALED(st)) {
		handle_exit(tid, st);
		return;
	}
	if (!WIFSTOPPED(st))
		return;
	t = task_find(tid);
	if (!t) /* an auto-attached child can report before its parent's event */
		t = task_add(tid, false);

	switch (event) {
	case PTRACE_EVENT_SECCOMP:
		on_seccomp_stop(t);
		return;
	case PTRACE_EVENT_CLONE:
	case PTRACE_EVENT_FORK:
	case PTRACE_EVENT_VFORK:
		if (ptrace(PTRACE_GETEVENTMSG, tid, NULL, &msg) == 0)
			task_add((pid_t)msg, false);
		resume(tid, 0);
		return;
	case PTRACE_EVENT_EXEC:
		resume(tid, 0);
		return;
	case PTRACE_EVENT_STOP:
		/* seized task: group-stop or the stop after a re-seize */
		t->started = true;
		resume(tid, 0);
		return;
	default:
		break;
	}
	if (!t->started && WSTOPSIG(st) == SIGSTOP) {
		/* the attach's (or a new child's) initial SIGSTOP */
		t->started = true;
		resume(tid, 0);
		return;
	}
	t->started = true;
	resume(tid, WSTOPSIG(st));
}

static void reap_all(void)
{
	for (;;) {
		int st;
		pid_t tid = waitpid(-1, &st, __WALL | WNOHANG);

		if (tid <= 0)
			return;
		handle_wait(tid, st);
	}
}

/* ---------------------------------------------------------- hand-off -- */

static ssize_t read_line(int fd, char *buf, size_t size, int timeout_ms)
{
	size_t n = 0;

	while (n + 1 < size) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		ssize_t r;

		if (poll(&p, 1, timeout_ms) <= 0)
			return -1;
		r = read(fd, buf + n, 1);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		if (buf[n] == '\n') {
			buf[n] = '\0';
			return (ssize_t)n;
		}
		n++;
	}
	return -1;
}

static void send_line(int fd, const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	buf[n++] = '\n';
	if (write(fd, buf, n) != n)
		note("could not answer CRIU: %s", strerror(errno));
}

/* Remember the processes (thread groups) we trace: the tree to hand over. */
static void record_tree_procs(void)
{
	nr_tree_procs = 0;
	for (int i = 0; i < MAX_TASKS; i++) {
		pid_t g;
		bool seen = false;

		if (!tasks[i].used)
			continue;
		g = tgid_of(tasks[i].tid);
		for (int j = 0; j < nr_tree_procs; j++)
			seen |= tree_procs[j] == g;
		if (g > 0 && !seen)
			tree_procs[nr_tree_procs++] = g;
	}
}

/* Every thread of the recorded processes, as seen in /proc now. */
static int tree_threads(pid_t *out, int max)
{
	int n = 0;

	for (int i = 0; i < nr_tree_procs; i++) {
		char path[64];
		DIR *d;
		struct dirent *e;

		snprintf(path, sizeof(path), "/proc/%d/task", tree_procs[i]);
		d = opendir(path);
		if (!d)
			continue;
		while ((e = readdir(d)) && n < max) {
			pid_t tid = atoi(e->d_name);

			if (tid > 0)
				out[n++] = tid;
		}
		closedir(d);
	}
	return n;
}

static int held_count(bool held)
{
	int n = 0;

	for (int i = 0; i < MAX_TASKS; i++)
		n += tasks[i].used && tasks[i].held == held;
	return n;
}

/*
 * Let go of the whole tree, leaving every thread we held parked and the
 * tree in group-stop. Order matters in a multi-threaded process: the
 * SIGSTOP goes to the shared queue, and a traced thread that dequeues it
 * sits in signal-delivery-stop until we pass it on. A parked thread
 * detached before the group-stop is in effect would find no SIGSTOP left
 * and run its syscall again, with no tracer: ENOSYS. So the running
 * threads are detached first (passing the SIGSTOP on starts the
 * group-stop), and the parked ones last.
 */
static int release_tree(int conn)
{
	int released = 0;

	record_tree_procs();
	for (int i = 0; i < MAX_TASKS; i++)
		if (tasks[i].used && tasks[i].held)
			park(&tasks[i]);
	for (int i = 0; i < nr_tree_procs; i++)
		kill(tree_procs[i], SIGSTOP);

	while (held_count(false) > 0) {
		int st, event;
		pid_t tid = waitpid(-1, &st, __WALL);
		struct task *t;

		if (tid < 0)
			die("waitpid during the hand-off: %s", strerror(errno));
		if (WIFEXITED(st) || WIFSIGNALED(st)) {
			task_del(tid);
			if (tid == root_pid)
				return -1;
			continue;
		}
		event = st >> 16;
		t = task_find(tid);
		if (!t) /* a brand-new thread: detach it too */
			t = task_add(tid, false);
		if (event == PTRACE_EVENT_CLONE || event == PTRACE_EVENT_FORK || event == PTRACE_EVENT_VFORK) {
			unsigned long msg;

			if (ptrace(PTRACE_GETEVENTMSG, tid, NULL, &msg) == 0)
				task_add((pid_t)msg, false);
		}
		if (event == PTRACE_EVENT_SECCOMP) {
			/* it reached the trap just now: park it like the others */
			struct user_regs_struct r;

			xptrace(PTRACE_GETREGS, tid, NULL, &r, "PTRACE_GETREGS");
			t->nr = (long)r.orig_rax;
			t->held = true;
			park(t);
			continue;
		}
		if (event) {
			xptrace(PTRACE_DETACH, tid, NULL, NULL, "PTRACE_DETACH");
		} else {
			/* a signal or group stop: pass the signal on (a SIGSTOP starts or joins the group-stop) */
			if (ptrace(PTRACE_DETACH, tid, NULL, (void *)(long)WSTOPSIG(st)) < 0 && errno != ESRCH)
				die("PTRACE_DETACH of %d failed: %s", tid, strerror(errno));
		}
		task_del(tid);
	}

	for (int i = 0; i < MAX_TASKS; i++) {
		if (!tasks[i].used || !tasks[i].held)
			continue;
		xptrace(PTRACE_DETACH, tasks[i].tid, NULL, NULL, "PTRACE_DETACH");
		send_line(conn, "RELEASED %d %ld", tasks[i].tid, tasks[i].nr);
		tasks[i].used = false;
		released++;
	}
	return released;
}

/* Wait (briefly) until every thread of the tree shows state T. */
static void wait_group_stopped(void)
{
	pid_t tids[MAX_TASKS];

	for (int round = 0; round < 200; round++) {
		int n = tree_threads(tids, MAX_TASKS);
		bool all = n > 0;

		for (int i = 0; i < n; i++)
			all &= proc_state(tids[i]) == 'T';
		if (all)
			return;
		usleep(5000);
	}
	note("warning: the tree is not entirely in group-stop yet; CRIU will handle it");
}

/* Trace the tree again after CRIU let go, and resume it. */
static void retake_tree(void)
{
	pid_t tids[MAX_TASKS];
	int n = tree_threads(tids, MAX_TASKS);

	for (int i = 0; i < n; i++) {
		if (ptrace(PTRACE_SEIZE, tids[i], NULL, (void *)(long)TRACE_OPTIONS) < 0) {
			/* a thread that died meanwhile is no loss; anything else is */
			if (errno == ESRCH || proc_state(tids[i]) == 'Z' || proc_state(tids[i]) == '?')
				continue;
			die("PTRACE_SEIZE of %d after the dump failed: %s", tids[i], strerror(errno));
		}
		task_add(tids[i], true);
	}
	status("retaken pid=%d threads=%d", root_pid, n);
	/*
	 * The tree is in group-stop; SIGCONT ends it and the PTRACE_EVENT_STOP
	 * each seized thread reports is answered with PTRACE_CONT. The parked
	 * syscall then runs again and traps again.
	 */
	for (int i = 0; i < nr_tree_procs; i++)
		kill(tree_procs[i], SIGCONT);
}

static void handle_handoff(int conn)
{
	char line[128];
	pid_t pid;
	int end = 0, released;
	bool held = false;

	if (read_line(conn, line, sizeof(line), 5000) < 0) {
		note("a client connected but sent no request");
		return;
	}
	if (sscanf(line, "HANDOFF %d%n", &pid, &end) != 1 || line[end] != '\0') {
		send_line(conn, "ERR unknown request");
		return;
	}
	if (pid != root_pid) {
		send_line(conn, "ERR this supervisor holds pid %d, not %d", root_pid, pid);
		return;
	}
	for (int i = 0; i < MAX_TASKS; i++)
		held |= tasks[i].used && tasks[i].held;
	if (!held) {
		send_line(conn, "ERR pid %d has not reached syscall %ld yet", pid, cfg.stop_nr);
		return;
	}

	released = release_tree(conn);
	if (released < 0) {
		send_line(conn, "ERR pid %d exited during the hand-off", pid);
		return;
	}
	wait_group_stopped();
	send_line(conn, "READY");
	status("handoff pid=%d released=%d", pid, released);
	dumped = true;

	/* CRIU may take a while; it has its own timeouts. */
	if (read_line(conn, line, sizeof(line), 600000) < 0) {
		status("done result=gone state=unknown");
	} else {
		char result[16] = "", state[16] = "";

		if (sscanf(line, "DONE %15s %15s", result, state) != 2)
			snprintf(result, sizeof(result), "gone"), snprintf(state, sizeof(state), "unknown");
		status("done result=%s state=%s", result, state);
		if (!strcmp(state, "killed"))
			return; /* the exit arrives through SIGCHLD */
	}
	if (kill(root_pid, 0) == 0)
		retake_tree();
}

/* -------------------------------------------------------------- main -- */

static long syscall_nr(const char *name)
{
	static const struct {
		const char *name;
		long nr;
	} known[] = {
		{ "listen", __NR_listen }, { "bind", __NR_bind },	{ "accept", __NR_accept },
		{ "accept4", __NR_accept4 }, { "connect", __NR_connect },
	};

	for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
		if (!strcmp(known[i].name, name))
			return known[i].nr;
	die("--stop-at %s: use listen, bind, accept, accept4 or connect", name);
	return -1;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: " PROG " --socket PATH --log-dir DIR (--root EMPTY_DIR | --no-sandbox)\n"
		"                [--stop-at listen|bind|accept|accept4|connect] [--seize]\n"
		"                [--after-dump release|hold] [--pidfile FILE] -- PROGRAM [ARGS...]\n");
	exit(2);
}

static void parse_args(int argc, char **argv)
{
	int i;

	for (i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(a, "--")) {
			i++;
			break;
		} else if (!strcmp(a, "--no-sandbox")) {
			cfg.sandbox = false;
		} else if (!strcmp(a, "--seize")) {
			cfg.seize = true;
		} else if (!v) {
			usage();
		} else if (!strcmp(a, "--socket")) {
			cfg.socket_path = v, i++;
		} else if (!strcmp(a, "--root")) {
			cfg.root = v, i++;
		} else if (!strcmp(a, "--log-dir")) {
			cfg.log_dir = v, i++;
		} else if (!strcmp(a, "--pidfile")) {
			cfg.pidfile = v, i++;
		} else if (!strcmp(a, "--stop-at")) {
			cfg.stop_nr = syscall_nr(v), i++;
		} else if (!strcmp(a, "--after-dump")) {
			if (!strcmp(v, "release"))
				cfg.after = AFTER_RELEASE;
			else if (!strcmp(v, "hold"))
				cfg.after = AFTER_HOLD;
			else
				die("--after-dump %s: use release or hold", v);
			i++;
		} else {
			usage();
		}
	}
	if (i >= argc || !cfg.socket_path || !cfg.log_dir || (cfg.sandbox && !cfg.root))
		usage();
	cfg.argv = &argv[i];
	if (cfg.log_dir[0] != '/' || (cfg.root && cfg.root[0] != '/'))
		die("--log-dir and --root must be absolute paths");
}

static int listen_socket(void)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	int fd;

	if (strlen(cfg.socket_path) >= sizeof(addr.sun_path))
		die("--socket %s is longer than %zu bytes", cfg.socket_path, sizeof(addr.sun_path) - 1);
	strcpy(addr.sun_path, cfg.socket_path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket: %s", strerror(errno));
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die("cannot listen on %s: %s (remove a stale socket first)", cfg.socket_path, strerror(errno));
	if (listen(fd, 4) < 0)
		die("listen on %s: %s", cfg.socket_path, strerror(errno));
	return fd;
}

static pid_t start_child(void)
{
	int go[2], err[2], st;
	pid_t pid;
	char msg[512];
	ssize_t n;
	unsigned long flags = SIGCHLD | (cfg.sandbox ? CLONE_NEWPID | CLONE_NEWNS : 0);

	if (pipe2(go, O_CLOEXEC) || pipe2(err, O_CLOEXEC))
		die("pipe: %s", strerror(errno));
	pid = (pid_t)syscall(SYS_clone, flags, NULL, NULL, NULL, NULL);
	if (pid < 0)
		die("clone: %s", strerror(errno));
	if (pid == 0) {
		close(go[1]);
		close(err[0]);
		_exit(child_main(go[0], err[1]));
	}
	close(go[0]);
	close(err[1]);
	root_pid = pid;

	if (cfg.seize) {
		xptrace(PTRACE_SEIZE, pid, NULL, (void *)(long)TRACE_OPTIONS, "PTRACE_SEIZE");
		task_add(pid, true);
	} else {
		/* 2018: PTRACE_ATTACH, whose SIGSTOP we swallow before going on. */
		xptrace(PTRACE_ATTACH, pid, NULL, NULL, "PTRACE_ATTACH");
		if (waitpid(pid, &st, __WALL) != pid || !WIFSTOPPED(st))
			die("the child did not stop after PTRACE_ATTACH");
		xptrace(PTRACE_SETOPTIONS, pid, NULL, (void *)(long)TRACE_OPTIONS, "PTRACE_SETOPTIONS");
		task_add(pid, true);
		resume(pid, 0);
	}
	if (write(go[1], "g", 1) != 1)
		die("cannot release the child: %s", strerror(errno));
	close(go[1]);

	/* The error pipe closes on exec (CLOEXEC) or carries the failure. */
	while ((n = read(err[0], msg, sizeof(msg) - 1)) < 0 && errno == EINTR)
		;
	if (n > 0) {
		msg[n] = '\0';
		die("the service could not start: %s", msg);
	}
	close(err[0]);
	return pid;
}

int main(int argc, char **argv)
{
	sigset_t mask;
	int lsk, sfd;
	char ext[512] = "";

	clock_gettime(CLOCK_MONOTONIC, &t0);
	parse_args(argc, argv);
	if (cfg.sandbox)
		find_special_mounts();
	lsk = listen_socket();

	/* SIGCHLD, SIGINT and SIGTERM arrive through a signalfd. */
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGTERM);
	if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
		die("sigprocmask: %s", strerror(errno));
	sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sfd < 0)
		die("signalfd: %s", strerror(errno));

	start_child();
	if (cfg.pidfile) {
		FILE *f = fopen(cfg.pidfile, "we");

		if (!f || fprintf(f, "%d\n", root_pid) < 0 || fclose(f))
			die("cannot write %s", cfg.pidfile);
	}
	for (size_t i = 0; cfg.sandbox && i < NR_SPECIAL; i++) {
		if (!special_present[i])
			continue;
		snprintf(ext + strlen(ext), sizeof(ext) - strlen(ext), "%s%s:%s", ext[0] ? "," : "",
			 special_mounts[i][0], special_mounts[i][1]);
	}
	status("started pid=%d externals=%s", root_pid, ext);

	for (;;) {
		struct pollfd p[2] = { { .fd = lsk, .events = POLLIN }, { .fd = sfd, .events = POLLIN } };

		reap_all();
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll: %s", strerror(errno));
		}
		if (p[1].revents & POLLIN) {
			struct signalfd_siginfo si;

			while (read(sfd, &si, sizeof(si)) == sizeof(si)) {
				if (si.ssi_signo == SIGINT || si.ssi_signo == SIGTERM) {
					note("got signal %u: killing pid %d", si.ssi_signo, root_pid);
					kill(root_pid, SIGKILL);
				}
			}
		}
		if (p[0].revents & POLLIN) {
			int conn = accept4(lsk, NULL, NULL, SOCK_CLOEXEC);

			if (conn >= 0) {
				handle_handoff(conn);
				close(conn);
			}
		}
	}
}
