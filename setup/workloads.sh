#!/usr/bin/env bash
# setup/workloads.sh: installs the benchmark workloads' dependencies (issue 6).
#
#   * Django (examples/django_app/requirements.txt) into the git-ignored venv
#     .deps/venv, made with Debian's /usr/bin/python3 -m venv (python3-venv is
#     installed with apt when missing): the sandbox sees the host's / as is,
#     and a Debian interpreter is the same one on every machine of this kind.
#   * The heavy workload, FastAPI + pandas/numpy (examples/fastapi_app/
#     requirements.txt), into its own venv .deps/venv-fastapi.
#   * Express (examples/express_app/package-lock.json) into
#     examples/express_app/node_modules (git-ignored) with `npm ci`.
#
# Idempotent and fast the second time: each part is skipped when a stamp
# holding the hash of its lock file matches. Package indexes come from the
# machine's own pip/npm/apt configuration; no host name is written here.
# Called by setup/install.sh; safe to run alone (as root for apt).
# Prints one summary line per workload; exit non-zero when one cannot be installed.

set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd -P)
DEPS="$REPO_ROOT/.deps"
VENV="$DEPS/venv"
DJANGO_REQS="$REPO_ROOT/examples/django_app/requirements.txt"
EXPRESS_DIR="$REPO_ROOT/examples/express_app"
FASTAPI_REQS="$REPO_ROOT/examples/fastapi_app/requirements.txt"

log() { printf 'workloads.sh: %s\n' "$*" >&2; }
die() { printf 'workloads.sh: error: %s\n' "$*" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1

mkdir -p "$DEPS"
# Concurrent runs would fight over the venv and node_modules.
exec 8>"$DEPS/.workloads.lock"
flock 8

hash_of() { sha256sum "$@" | sha256sum | cut -d' ' -f1; }

apt_install() {
    [[ $(id -u) -eq 0 ]] || die "$* is missing and installing it needs root: sudo apt-get install $*"
    log "apt-get install $*"
    apt-get -q -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "$@" </dev/null >&2 || {
        apt-get -q -o DPkg::Lock::Timeout=300 update </dev/null >&2 &&
            apt-get -q -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "$@" </dev/null >&2
    } || die "cannot install $* with apt"
}

# ------------------------------------------------------------------ Django --
django() {
    local stamp="$VENV/.miehisto-requirements.sha256" want
    want=$(hash_of "$DJANGO_REQS" /usr/bin/python3)
    if [[ -x $VENV/bin/python && -f $stamp && $(cat "$stamp") == "$want" ]]; then
        log "django: up to date in $VENV ($("$VENV/bin/python" -c 'import django; print(django.get_version())'))"
        return 0
    fi
    [[ -x /usr/bin/python3 ]] || apt_install python3
    if ! /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null; then
        apt_install python3-venv
    fi
    if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.base_prefix != "/usr")' 2>/dev/null; then
        rm -rf -- "$VENV"
        log "django: creating $VENV with /usr/bin/python3 -m venv"
        /usr/bin/python3 -m venv "$VENV"
    fi
    log "django: pip install -r ${DJANGO_REQS#"$REPO_ROOT"/}"
    "$VENV/bin/python" -m pip install -q --no-input -r "$DJANGO_REQS" >&2 ||
        die "pip could not install Django into $VENV; check the network and pip's configuration, then re-run"
    "$VENV/bin/python" -c 'import django' || die "Django does not import from $VENV"
    printf '%s\n' "$want" >"$stamp"
    log "django: installed ($("$VENV/bin/python" -c 'import django; print(django.get_version())'))"
}

# ------------------------------------------------------ FastAPI (heavy) --
# The heavy workload: FastAPI, pydantic, uvicorn, numpy and pandas, pinned,
# as binary wheels (no compiler run: the install stays well under a minute)
# into a venv of its own, .deps/venv-fastapi, so its packages never change
# the Django workload's.
fastapi_app() {
    local venv="$DEPS/venv-fastapi" stamp want
    stamp="$venv/.miehisto-requirements.sha256"
    want=$(hash_of "$FASTAPI_REQS" /usr/bin/python3)
    if [[ -x $venv/bin/python && -f $stamp && $(cat "$stamp") == "$want" ]]; then
        log "fastapi: up to date in $venv"
        return 0
    fi
    if ! /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null; then
        apt_install python3-venv
    fi
    rm -rf -- "$venv"
    log "fastapi: creating $venv with /usr/bin/python3 -m venv"
    /usr/bin/python3 -m venv "$venv"
    log "fastapi: pip install -r ${FASTAPI_REQS#"$REPO_ROOT"/}"
    "$venv/bin/python" -m pip install -q --no-input --only-binary=:all: -r "$FASTAPI_REQS" >&2 ||
        die "pip could not install the FastAPI workload into $venv; check the network and pip's configuration, then re-run"
    "$venv/bin/python" -c 'import fastapi, uvicorn, pandas, numpy' ||
        die "the FastAPI workload does not import from $venv"
    printf '%s\n' "$want" >"$stamp"
    log "fastapi: installed ($("$venv/bin/python" -c 'import fastapi, pandas; print("fastapi", fastapi.__version__, "pandas", pandas.__version__)'))"
}

# ----------------------------------------------------------------- Express --
express() {
    local stamp="$EXPRESS_DIR/node_modules/.miehisto-lock.sha256" want
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        apt_install nodejs npm
    fi
    want=$(hash_of "$EXPRESS_DIR/package.json" "$EXPRESS_DIR/package-lock.json")
    if [[ -f $stamp && $(cat "$stamp") == "$want" && -d $EXPRESS_DIR/node_modules/express ]]; then
        log "express: up to date in ${EXPRESS_DIR#"$REPO_ROOT"/}/node_modules (node $(node --version))"
        return 0
    fi
    log "express: npm ci in ${EXPRESS_DIR#"$REPO_ROOT"/}"
    (cd -- "$EXPRESS_DIR" && npm ci --no-audit --no-fund --loglevel=error </dev/null >&2) ||
        die "npm ci failed in $EXPRESS_DIR; check the network and npm's configuration, then re-run"
    printf '%s\n' "$want" >"$stamp"
    log "express: installed (node $(node --version), express $(node -p 'require(process.argv[1]).version' "$EXPRESS_DIR/node_modules/express/package.json"))"
}

django
fastapi_app
express
