#!/usr/bin/env bash
# seize-patch/verify.sh: checks the patched CRIU end to end with the real
# tools, for each of a single-threaded and a 4-thread payload:
#
#   1. the talk's 2018 flow: handoff-supervisor PTRACE_ATTACHes the payload
#      and holds it in its seccomp ptrace-stop at listen(2);
#   2. the stock CRIU's dump of it fails (its PTRACE_SEIZE gets EPERM);
#   3. a patched dump that fails on purpose after the seize (CRIU_FAULT=3,
#      CRIU's own fault injection) hands the task back: the supervisor
#      re-takes it and holds it at listen again;
#   4. `criu dump --seize-handoff` dumps it;
#   5. a plain restore + SIGCONT: listen fails with ENOSYS (the talk's);
#   6. `criu restore --seccomp-neutralize-traps` + SIGCONT, no supervisor:
#      listen succeeds and the service answers HTTP.
#
# Prints one "ok"/"FAIL" line per check and exits 1 if any failed. Runs
# seize-patch/build.sh first (a no-op when up to date). Must run as root.
# Leaves no process, mount or temporary directory behind.

set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd -P)

die() { printf 'seize-patch/verify.sh: error: %s\n' "$*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "must run as root (namespaces, ptrace, CRIU): sudo bash seize-patch/verify.sh"
for tool in gcc curl unshare python3; do
    command -v "$tool" >/dev/null || die "$tool not found: run 'bash setup/install.sh'"
done

bash "$SCRIPT_DIR/build.sh" >/dev/null
# shellcheck source=/dev/null
. "$REPO_ROOT/.deps/criu-patched/env.sh"
# shellcheck source=/dev/null
. "$REPO_ROOT/.deps/env.sh"
PATCHED=$MIEHISTO_CRIU_PATCHED
STOCK=$MIEHISTO_CRIU
SUP=$MIEHISTO_HANDOFF_SUPERVISOR

# Everything lives under the root filesystem (the sandbox sees only it).
WORK=$(mktemp -d /var/tmp/seize-patch-verify.XXXXXX)
SUP_PIDS=()
RESTORED=()
# shellcheck disable=SC2317 # called through the EXIT trap
cleanup() {
    local p
    for p in "${RESTORED[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    for p in "${SUP_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${SUP_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf -- "$WORK"
}
trap cleanup EXIT

FAILED=0
check() { # check NAME CONDITION-EXIT-STATUS DETAIL
    if [[ $2 == 0 ]]; then printf 'ok    %s\n' "$1"; else printf 'FAIL  %s: %s\n' "$1" "$3"; FAILED=1; fi
}

mkdir -p "$WORK/bin"
gcc -O2 -pthread -o "$WORK/bin/simple_server" "$REPO_ROOT/examples/simple_server.c"
gcc -O2 -pthread -o "$WORK/bin/threaded_server" "$REPO_ROOT/examples/threaded_server.c"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_for FILE REGEX [N]: waits (up to ~10 s) until FILE has N (default 1) lines matching REGEX.
wait_for() {
    local n=${3:-1}
    for _ in $(seq 200); do
        [[ $(grep -cE "$2" "$1" 2>/dev/null || true) -ge $n ]] && return 0
        sleep 0.05
    done
    return 1
}

EXT=(--external 'mnt[/dev]:dev' --external 'mnt[/dev/pts]:devpts' --external 'mnt[/dev/shm]:devshm' --external 'mnt[/sys]:sys')

# restore CRIU IMAGES WORKDIR [criu args...]: what runmh does, minus runmh:
# a private mount namespace, the host / bound onto a fresh --root, the
# external mounts mapped back; -d, so nothing is left to supervise it.
restore() {
    local criu=$1 img=$2 w=$3
    shift 3
    mkdir -p "$w/rr"
    # shellcheck disable=SC2016 # $0 and $@ are the inner shell's
    unshare -m --propagation private -- /bin/sh -c 'mount --bind / "$0" && exec "$@"' "$w/rr" \
        "$criu" restore -D "$img" -W "$w" -o restore.log -v4 --root "$w/rr" \
        --external 'mnt[dev]:/dev' --external 'mnt[devpts]:/dev/pts' --external 'mnt[devshm]:/dev/shm' \
        --external 'mnt[sys]:/sys' -d --pidfile "$w/pid" "$@"
    local rc=$?
    rmdir "$w/rr"
    [[ $rc == 0 ]] && RESTORED+=("$(cat "$w/pid")")
    return $rc
}

run_payload() {
    local name=$1 d="$WORK/$1" port pid out
    mkdir -p "$d/root" "$d/logs" "$d/img" "$d/img-stock" "$d/img-fault"
    port=$(free_port)
    out="$d/sup.out"
    "$SUP" --socket "$d/sup.sock" --root "$d/root" --log-dir "$d/logs" --after-dump hold \
        -- "$WORK/bin/$name" --port "$port" >"$out" 2>"$d/sup.err" </dev/null &
    SUP_PIDS+=($!)
    wait_for "$out" '^MHSUP held ' || { check "$name: 2018 tracer holds the task at listen" 1 "$(cat "$out" "$d/sup.err")"; return; }
    pid=$(sed -n 's/^MHSUP started pid=\([0-9]*\).*/\1/p' "$out")
    check "$name: 2018 tracer holds the task at listen" 0 ""

    "$STOCK" dump -t "$pid" -D "$d/img-stock" -o dump.log -v4 "${EXT[@]}" >/dev/null 2>&1 && rc=0 || rc=$?
    grep -q 'Unable to interrupt task.*Operation not permitted' "$d/img-stock/dump.log" && seen=0 || seen=1
    check "$name: stock criu dump fails while the tracer holds it (EPERM)" $((rc == 0 || seen)) "rc=$rc, see $d/img-stock/dump.log"

    CRIU_FAULT=3 "$PATCHED" dump -t "$pid" -D "$d/img-fault" -o dump.log -v4 "${EXT[@]}" \
        --seize-handoff "$d/sup.sock" >/dev/null 2>&1 && rc=0 || rc=$?
    wait_for "$out" '^MHSUP held ' 2 && held=0 || held=1
    check "$name: a failed patched dump hands the task back, held at listen again" $((rc == 0 || held)) \
        "rc=$rc; $(tail -n 3 "$out" | tr '\n' ' ')"

    "$PATCHED" dump -t "$pid" -D "$d/img" -o dump.log -v4 "${EXT[@]}" --seize-handoff "$d/sup.sock" \
        >/dev/null 2>&1 && rc=0 || rc=$?
    grep -q 'seize-handoff: tid .* is parked' "$d/img/dump.log" && parked=0 || parked=1
    check "$name: criu dump --seize-handoff dumps it" $((rc != 0 || parked)) "rc=$rc, see $d/img/dump.log"
    wait_for "$out" '^MHSUP exit ' || true

    local before
    before=$(grep -c 'listen ret=' "$d/logs/stdout.log" || true)
    if restore "$PATCHED" "$d/img" "$d/w-plain" >/dev/null 2>&1; then
        kill -CONT "${RESTORED[-1]}"
        wait_for "$d/logs/stdout.log" 'listen ret=' $((before + 1)) || true
        grep 'listen ret=' "$d/logs/stdout.log" | tail -n 1 | grep -q 'ret=-1 errno=38' && rc=0 || rc=1
        check "$name: plain restore: listen fails with ENOSYS (the talk's failure)" "$rc" "$(tail -n 2 "$d/logs/stdout.log")"
    else
        check "$name: plain restore" 1 "see $d/w-plain/restore.log"
    fi

    before=$(grep -c 'listen ret=' "$d/logs/stdout.log" || true)
    if restore "$PATCHED" "$d/img" "$d/w-neutral" --seccomp-neutralize-traps >/dev/null 2>&1; then
        local rp=${RESTORED[-1]} code
        kill -CONT "$rp"
        wait_for "$d/logs/stdout.log" 'listen ret=' $((before + 1)) || true
        grep 'listen ret=' "$d/logs/stdout.log" | tail -n 1 | grep -q 'ret=0 errno=0' && rc=0 || rc=1
        code=$(curl -s -o /dev/null -w '%{http_code}' -m 3 "http://127.0.0.1:$port/health" || true)
        tracer=$(awk '/^TracerPid:/ { print $2 }' "/proc/$rp/status" 2>/dev/null || echo '?')
        [[ $rc == 0 && $code == 200 && $tracer == 0 ]] && rc=0 || rc=1
        check "$name: restore --seccomp-neutralize-traps: listen ret=0, HTTP $code, TracerPid $tracer" \
            "$rc" "$(tail -n 2 "$d/logs/stdout.log")"
        kill -TERM "$rp" 2>/dev/null || true
    else
        check "$name: restore --seccomp-neutralize-traps" 1 "see $d/w-neutral/restore.log"
    fi
}

run_payload simple_server
run_payload threaded_server
exit $FAILED
