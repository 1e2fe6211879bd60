#!/usr/bin/env bash
# setup/install.sh: the one idempotent machine set-up step for miehisto.
#
# What it does, and why:
#   1. Installs the Debian packages the build, the tests and the CRIU build
#      need. apt is skipped entirely when everything is already installed, so
#      a second run takes well under a second or two.
#   2. Provides a CRIU >= 4.2 whose `criu check` passes on this kernel
#      (bookworm's 3.17 fails `criu check` on kernels >= 6.13, 4.1 cannot
#      dump TCP sockets on kernels >= 6.16). Order: a system criu if good
#      enough, else the cached build in .deps/criu, else a build from
#      Debian unstable's source package (4.2.1). Another suite and version
#      can be asked for (below; e.g. experimental's 4.3), with unstable as
#      the fallback when that suite lacks it; a cached build older than an
#      asked-for version is replaced once that one can be fetched (tried at
#      most once a day). Always built from source, never a binary package.
#   3. Writes .deps/env.sh (MIEHISTO_CRIU, MIEHISTO_PYTHON) and prints one
#      summary line per component.
#
# Must run as root, from anywhere, with no stdin. Never writes a package
# mirror's host name into the repository: the mirror is read at run time
# from the machine's apt configuration (or MIEHISTO_DEBIAN_MIRROR).
#
# `setup/install.sh --pristine-tree VERSION` only prints the path of an
# unpacked, unmodified CRIU VERSION source tree (fetched when not kept);
# seize-patch/build.sh uses it for the version its patches are written for.
#
# Optional environment:
#   MIEHISTO_CRIU            use this criu binary (must pass the same checks)
#   MIEHISTO_DEBIAN_MIRROR   Debian mirror URI to fetch CRIU's source from
#   MIEHISTO_CRIU_SUITE      Debian suite to build CRIU from (default
#                            "unstable"; e.g. "experimental")
#   MIEHISTO_CRIU_VERSION    upstream version wanted from it (default: any
#                            >= 4.2; e.g. "4.3"); unstable's is the fallback
#   MIEHISTO_CRIU_SOURCE     apt source spec in that suite (default "criu";
#                            e.g. "criu=4.3-1~exp2")

set -euo pipefail

# Resolve the repo root from this file's location so a clean clone works in
# any folder and from any working directory.
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd -P)
DEPS="$REPO_ROOT/.deps"

CRIU_MIN_VERSION=4.2
CRIU_PREFIX="$DEPS/criu"
CRIU_BUILT="$CRIU_PREFIX/sbin/criu"
CRIU_SRC_ROOT="$DEPS/criu-src"
APT_STAMP="$DEPS/apt-update.stamp"
GO_UNAVAILABLE_MARK="$DEPS/golang-go.unavailable"

# Everything the project and the CRIU build need. python3 is Debian's (so
# /usr/bin/python3 exists regardless of pyenv & co.). curl fetches the CRIU
# tarball when `apt-get source` fails half-way; xz-utils unpacks it.
REQUIRED_PACKAGES=(
    libseccomp-dev pkg-config gcc make libc6-dev python3 iproute2 procps wrk
    xz-utils curl ca-certificates util-linux
    # CRIU's build dependencies (platform.md, verified with `make criu`).
    libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
    python3-protobuf libnl-3-dev libnet1-dev libcap-dev libbsd-dev
    libnftables-dev libgnutls28-dev uuid-dev
    # The fleet tests: a real sshd in a test network namespace, and the ssh
    # client mhctl --host ssh:// runs (see install_sshd_quietly below).
    openssh-client
)
# Nice to have (helpers/examples may use it); never fatal when unavailable.
OPTIONAL_PACKAGES=(golang-go)

log() { printf 'install.sh: %s\n' "$*" >&2; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

# apt must never prompt (no stdin in CI) and should wait for a dpkg lock held
# by another apt run instead of failing at once.
export DEBIAN_FRONTEND=noninteractive
APT_COMMON=(-q -o DPkg::Lock::Timeout=300)

[[ $(id -u) -eq 0 ]] || die "must run as root (apt and 'criu check' need it): sudo bash setup/install.sh"
if ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
    die "apt-get/dpkg-query not found: this script supports Debian 12 (bookworm) only"
fi

mkdir -p "$DEPS"
# Serialise concurrent runs (e.g. test.sh and demo.sh started together): both
# would otherwise fight over apt and .deps/.
exec 9>"$DEPS/.install.lock"
if ! flock -n 9; then
    log "another install.sh is running; waiting for it"
    flock 9
fi

TMP_DIR=""
cleanup() { [[ -z $TMP_DIR ]] || rm -rf -- "$TMP_DIR"; }
trap cleanup EXIT

# ---------------------------------------------------------------- packages --

# Prints the packages among "$@" that are not fully installed.
missing_packages() {
    local status name st p
    local -A have=()
    status=$(dpkg-query -W -f='${Package}\t${db:Status-Abbrev}\n' "$@" 2>/dev/null || true)
    while IFS=$'\t' read -r name st; do
        [[ $st == ii* ]] && have[$name]=1
    done <<<"$status"
    for p in "$@"; do
        [[ -n ${have[$p]:-} ]] || printf '%s\n' "$p"
    done
}

# True when our own apt-get update ran less than a day ago. apt sets the
# lists' mtimes from the server, so they cannot tell when we last updated.
apt_lists_fresh() { [[ -n $(find "$APT_STAMP" -mmin -1440 2>/dev/null) ]]; }

APT_UPDATED=0
apt_update() {
    ((APT_UPDATED)) && return 0
    log "apt-get update"
    apt-get "${APT_COMMON[@]}" update </dev/null >&2 ||
        die "apt-get update failed: check the network and /etc/apt/sources.list*, then re-run"
    touch "$APT_STAMP"
    APT_UPDATED=1
}

apt_install() {
    log "apt-get install $*"
    apt-get "${APT_COMMON[@]}" install -y --no-install-recommends "$@" </dev/null >&2
}

ensure_packages() {
    local -a missing
    mapfile -t missing < <(missing_packages "${REQUIRED_PACKAGES[@]}")
    if ((${#missing[@]})); then
        # Fresh lists: try without an update first; stale lists can point at
        # versions the mirror no longer has, so update and retry on failure.
        apt_lists_fresh || apt_update
        if ! apt_install "${missing[@]}"; then
            ((APT_UPDATED)) && die "apt-get install failed for: ${missing[*]} (see apt's message above)"
            apt_update
            apt_install "${missing[@]}" ||
                die "apt-get install failed for: ${missing[*]} (see apt's message above)"
        fi
    fi

    # Optional packages: try at most once a day, so a mirror without them
    # does not make every run slow.
    mapfile -t missing < <(missing_packages "${OPTIONAL_PACKAGES[@]}")
    if ((${#missing[@]})) && [[ -z $(find "$GO_UNAVAILABLE_MARK" -mmin -1440 2>/dev/null) ]]; then
        apt_lists_fresh || apt_update
        if apt_install "${missing[@]}"; then
            rm -f -- "$GO_UNAVAILABLE_MARK"
        else
            warn "optional packages not installed: ${missing[*]} (will retry tomorrow; not needed for the core)"
            touch "$GO_UNAVAILABLE_MARK"
        fi
    fi

    [[ -x /usr/bin/python3 ]] || die "/usr/bin/python3 missing after install: run 'apt-get install python3'"
}

# Debian's openssh-server postinst starts sshd and enables ssh.service. The
# tests run their own sshd (own config, keys and port, in a network
# namespace they create); a host-wide sshd must neither start nor be
# enabled by this script. So, only when the package is not installed yet:
#   * /etc/ssh/sshd_not_to_be_run (Debian's documented switch, honoured by
#     ssh.service and /etc/init.d/ssh) is created before the install;
#   * a policy-rc.d that denies every start is put in place for the install
#     when none exists (removed afterwards; an existing one is left alone);
#   * ssh.service is disabled again afterwards when systemctl is present.
# An sshd the administrator installed and configured is never touched.
install_sshd_quietly() {
    [[ -z $(missing_packages openssh-server) ]] && return 0
    local policy=/usr/sbin/policy-rc.d ours=0
    mkdir -p /etc/ssh
    touch /etc/ssh/sshd_not_to_be_run
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# temporary, from miehisto setup/install.sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        ours=1
    fi
    apt_lists_fresh || apt_update
    local rc=0
    apt_install openssh-server || { apt_update && apt_install openssh-server; } || rc=$?
    ((ours)) && rm -f -- "$policy"
    ((rc == 0)) || die "apt-get install openssh-server failed (see apt's message above)"
    if command -v systemctl >/dev/null; then
        systemctl disable ssh.service ssh.socket >/dev/null 2>&1 || true
    fi
    log "openssh-server installed for the tests; the host-wide sshd is neither started nor enabled (/etc/ssh/sshd_not_to_be_run)"
}

# The OCI tests start their own docker-registry (the CNCF distribution
# registry: own config file, storage directory and loopback port) and read
# what miehisto pushed with skopeo. The package's own service (port 5000,
# /var/lib/docker-registry) must neither start nor stay enabled: only when
# a package is missing, a policy-rc.d denying every start is put in place
# for the install when none exists (removed afterwards; an existing one is
# left alone), and the unit is disabled again when systemctl exists.
install_registry_quietly() {
    local -a missing
    mapfile -t missing < <(missing_packages docker-registry skopeo)
    ((${#missing[@]})) || return 0
    local policy=/usr/sbin/policy-rc.d ours=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# temporary, from miehisto setup/install.sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        ours=1
    fi
    apt_lists_fresh || apt_update
    local rc=0
    apt_install "${missing[@]}" || { apt_update && apt_install "${missing[@]}"; } || rc=$?
    ((ours)) && rm -f -- "$policy"
    ((rc == 0)) || die "apt-get install ${missing[*]} failed (see apt's message above)"
    if command -v systemctl >/dev/null; then
        systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
    fi
    log "installed ${missing[*]} for the OCI tests; the package's registry service is neither started nor enabled"
}

# -------------------------------------------------------------------- criu --

# version_ge A B: true when version A >= version B.
version_ge() { printf '%s\n%s\n' "$2" "$1" | sort -V -C; }

# criu_usable BIN: true when BIN is a criu >= CRIU_MIN_VERSION whose
# `criu check` exits 0 (its harmless "rlimit: Can't setup RLIMIT_NOFILE"
# error line is ignored: only the exit code counts). Sets CRIU_VERSION and,
# on failure, CRIU_REASON.
CRIU_VERSION=""
CRIU_REASON=""
criu_usable() {
    local bin=$1
    CRIU_VERSION=""
    CRIU_REASON=""
    if [[ ! -x $bin ]]; then
        CRIU_REASON="not an executable file"
        return 1
    fi
    CRIU_VERSION=$("$bin" --version 2>/dev/null </dev/null | sed -n 's/^Version: *//p' || true)
    if [[ -z $CRIU_VERSION ]]; then
        CRIU_REASON="'criu --version' printed no version"
        return 1
    fi
    if ! version_ge "$CRIU_VERSION" "$CRIU_MIN_VERSION"; then
        CRIU_REASON="version $CRIU_VERSION < $CRIU_MIN_VERSION"
        return 1
    fi
    if ! "$bin" check >"$DEPS/criu-check.log" 2>&1 </dev/null; then
        CRIU_REASON="'criu check' failed (output in $DEPS/criu-check.log)"
        return 1
    fi
}

# Prints the Debian mirror URI from the machine's apt configuration: the
# first source serving this release's codename (deb822 *.sources files and
# one-line *.list files), else the first URI ending in /debian.
debian_mirror() {
    if [[ -n ${MIEHISTO_DEBIAN_MIRROR:-} ]]; then
        printf '%s\n' "$MIEHISTO_DEBIAN_MIRROR"
        return
    fi
    local codename="" f entries="" mirror
    # shellcheck source=/dev/null
    codename=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        # deb822: one stanza per paragraph; print "URI<TAB>suite" per suite.
        entries+=$(awk '
            function flush(   n, m, i, u, s) {
                if (uris != "" && tolower(enabled) != "no") {
                    n = split(uris, u, /[ \t]+/)
                    m = split(suites, s, /[ \t]+/)
                    for (i = 1; i <= m; i++) if (s[i] != "") print u[1] "\t" s[i]
                }
                uris = ""; suites = ""; enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            match($0, /^[A-Za-z-]+:/) {
                key = tolower(substr($0, 1, RLENGTH - 1))
                val = substr($0, RLENGTH + 1)
                gsub(/^[ \t]+|[ \t]+$/, "", val)
                if (key == "uris") uris = val
                else if (key == "suites") suites = val
                else if (key == "enabled") enabled = val
            }
            END { flush() }' "$f")$'\n'
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        # One-line format: "deb [options] URI suite components...".
        entries+=$(sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" |
            awk '$1 == "deb" || $1 == "deb-src" { print $2 "\t" $3 }')$'\n'
    done
    mirror=$(awk -F'\t' -v c="$codename" '$2 == c && $1 != "" { print $1; exit }' <<<"$entries")
    if [[ -z $mirror ]]; then
        mirror=$(awk -F'\t' '$1 ~ /\/debian\/?$/ { print $1; exit }' <<<"$entries")
    fi
    [[ -n $mirror ]] ||
        die "no Debian mirror found in /etc/apt/sources.list*: set MIEHISTO_DEBIAN_MIRROR to a Debian mirror URI and re-run"
    printf '%s\n' "$mirror"
}

# Downloads CRIU's upstream tarball (criu_X.orig.tar.*) from the source
# package "$3" (an apt source spec: "criu" or "criu=DEBIAN-VERSION") of
# Debian suite "$2" into directory $1, using a private apt configuration so
# the machine's own sources, lists and cache stay untouched. With a fourth
# argument, only a tarball of that upstream version is accepted. Returns 1,
# with a warning saying why, when the suite has no such tarball or a mirror
# does not serve it (experimental's files have been seen listed in the index
# and answering 404); dies only on what re-running cannot fix.
fetch_criu_orig() {
    local out=$1 suite=$2 spec=$3 want=${4:-} mirror apt_dir keyring_opt=""
    local -a apt_opts
    mirror=$(debian_mirror)
    apt_dir="$TMP_DIR/apt-$suite"
    rm -rf -- "$out"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$out"
    if [[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]]; then
        keyring_opt="[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
    fi
    printf 'deb-src %s%s %s main\n' "$keyring_opt" "$mirror" "$suite" >"$apt_dir/sources.list"
    apt_opts=(
        "${APT_COMMON[@]}"
        -o "Dir::Etc::sourcelist=$apt_dir/sources.list"
        -o "Dir::Etc::sourceparts=-"
        -o "Dir::State::Lists=$apt_dir/lists"
        -o "Dir::Cache=$apt_dir/cache"
        -o "APT::Get::List-Cleanup=0"
        # Files land in a root-owned private dir; skip the _apt sandbox
        # (and its warning) for this download only.
        -o "APT::Sandbox::User=root"
    )
    log "fetching the index of Debian $suite sources (private apt state in $apt_dir)"
    if ! apt-get "${apt_opts[@]}" update </dev/null >&2; then
        warn "apt-get update of the private $suite deb-src source failed (mirror from the apt configuration or MIEHISTO_DEBIAN_MIRROR)"
        return 1
    fi

    # Which upstream tarball the source package has, and its checksum, from
    # the signed index (the URI comes from apt at run time).
    local uris line uri file sum algo version
    if ! uris=$(cd "$out" && apt-get "${apt_opts[@]}" source --print-uris "$spec" </dev/null 2>/dev/null); then
        warn "Debian $suite has no source package matching '$spec'"
        return 1
    fi
    line=$(grep -E "^'[^']+' criu_[^ ]+\.orig\.tar\.[a-z0-9]+ " <<<"$uris" | head -n 1 || true)
    if [[ -z $line ]]; then
        warn "apt lists no criu_*.orig.tar.* for '$spec' in Debian $suite"
        return 1
    fi
    read -r uri file _ sum <<<"$line"
    uri=${uri//\'/}
    version=${file#criu_}
    version=${version%.orig.tar.*}
    if [[ -n $want && $version != "$want" ]]; then
        warn "Debian $suite has CRIU $version, not $want"
        return 1
    fi

    # The .debian.tar.xz part has been seen answering 404; only the upstream
    # tarball is needed, so a failure of `apt-get source` is not final.
    log "apt-get source --download-only $spec (Debian $suite, CRIU $version)"
    if ! (cd "$out" && apt-get "${apt_opts[@]}" source --download-only "$spec" </dev/null >&2); then
        if [[ -f $out/$file ]]; then
            log "apt-get source did not fetch every part, but $file is there (the only part needed)"
        else
            log "apt-get source did not fetch $file; trying it alone"
        fi
    fi
    if [[ ! -f $out/$file ]]; then
        log "downloading $file"
        if ! curl -fsSL --retry 3 -o "$out/$file.part" "$uri"; then
            rm -f -- "$out/$file.part"
            warn "download of $file from Debian $suite failed (the mirror does not serve it)"
            return 1
        fi
        algo=${sum%%:*}
        sum=${sum#*:}
        case ${algo^^} in
        SHA256) echo "$sum  $out/$file.part" | sha256sum -c --quiet - ;;
        SHA512) echo "$sum  $out/$file.part" | sha512sum -c --quiet - ;;
        *) die "unexpected checksum type '$algo' from apt for $file" ;;
        esac || die "checksum mismatch for $file from Debian $suite: re-run (a mirror served a damaged file)"
        mv -- "$out/$file.part" "$out/$file"
    fi
    # Keep only the tarball: the caller globs for exactly one.
    find "$out" -maxdepth 1 -type f ! -name "$file" -delete
}

# Unpacks tarball $1 as the pristine tree CRIU_SRC_ROOT/criu-<version>,
# replacing any earlier (possibly modified) copy. Prints the tree's path.
unpack_pristine() {
    local tarball=$1 version x top
    version=$(basename -- "$tarball")
    version=${version#criu_}
    version=${version%.orig.tar.*}
    x=$(mktemp -d "$TMP_DIR/unpack.XXXXXX")
    tar -xf "$tarball" -C "$x" || die "cannot unpack $tarball: delete it and re-run"
    shopt -s nullglob dotglob
    local entries=("$x"/*)
    shopt -u nullglob dotglob
    if ((${#entries[@]} != 1)) || [[ ! -d ${entries[0]} ]]; then
        die "unexpected layout in $tarball (expected one top-level directory)"
    fi
    top="$CRIU_SRC_ROOT/criu-$version"
    rm -rf -- "$top"
    mv -- "${entries[0]}" "$top"
    printf '%s\n' "$top"
}

# Builds CRIU from the pristine tree $1 (in a throw-away copy, so the
# pristine tree stays unmodified for patching) and installs it as
# CRIU_BUILT once it passes the checks. Returns 1 with CRIU_REASON set on
# failure (CRIU_BUILT is then left as it was).
build_criu() {
    local src=$1 build jobs buildlog="$DEPS/criu-build.log"
    build="$TMP_DIR/build"
    rm -rf -- "$build"
    mkdir -p "$build"
    cp -a -- "$src" "$build/"
    build="$build/$(basename -- "$src")"
    jobs=$(nproc 2>/dev/null || echo 2)
    log "building CRIU in $build (make -j$jobs criu; log: $buildlog)"
    # WERROR=0: a newer compiler's new warning must not break the build.
    if ! make -C "$build" -j"$jobs" WERROR=0 criu >"$buildlog" 2>&1 </dev/null; then
        tail -n 25 "$buildlog" >&2
        CRIU_REASON="the build of $src failed (full log: $buildlog): install the missing -dev package it names and re-run"
        return 1
    fi
    mkdir -p "$CRIU_PREFIX/sbin"
    install -m 0755 "$build/criu/criu" "$CRIU_BUILT.new"
    if ! criu_usable "$CRIU_BUILT.new"; then
        rm -f -- "$CRIU_BUILT.new"
        CRIU_REASON="the CRIU built from $src is unusable: $CRIU_REASON"
        return 1
    fi
    mv -f -- "$CRIU_BUILT.new" "$CRIU_BUILT"
}

# Records the built CRIU's version and pristine source tree.
record_criu_build() {
    local src=$1
    printf '%s\n' "$CRIU_VERSION" >"$CRIU_PREFIX/VERSION"
    printf '%s\n' "$src" >"$CRIU_PREFIX/SOURCE_DIR"
}

# Prints the kept tarball of upstream version $1 (nothing when there is none).
kept_tarball() {
    local -a t
    shopt -s nullglob
    t=("$CRIU_SRC_ROOT/criu_$1".orig.tar.*)
    shopt -u nullglob
    ((${#t[@]})) && printf '%s\n' "${t[0]}"
    return 0
}

# Prints the newest kept tarball whose version is >= CRIU_MIN_VERSION and
# is not $1 (the wanted version, when falling back from it).
newest_kept_tarball() {
    local skip=${1:-} t v best="" bestv=""
    shopt -s nullglob
    for t in "$CRIU_SRC_ROOT"/criu_*.orig.tar.*; do
        v=$(basename -- "$t")
        v=${v#criu_}
        v=${v%.orig.tar.*}
        version_ge "$v" "$CRIU_MIN_VERSION" || continue
        [[ $v != "$skip" ]] || continue
        if [[ -z $bestv ]] || version_ge "$v" "$bestv"; then
            best=$t
            bestv=$v
        fi
    done
    shopt -u nullglob
    [[ -z $best ]] || printf '%s\n' "$best"
}

# obtain_tarball SUITE SPEC [VERSION [SKIP]]: prints the path of a kept
# upstream tarball of VERSION (without one: the newest kept one that is not
# SKIP), fetching it from Debian SUITE's source package SPEC into
# CRIU_SRC_ROOT when it is not kept yet (a kept tarball was verified by apt
# or our checksum before it was moved into place, and keeps the version
# stable while a suite moves on). Returns 1 when the suite does not have it.
obtain_tarball() {
    local suite=$1 spec=$2 want=${3:-} skip=${4:-} t
    local -a got
    if [[ -n $want ]]; then
        t=$(kept_tarball "$want")
    else
        t=$(newest_kept_tarball "$skip")
    fi
    if [[ -n $t ]]; then
        log "reusing $t"
        printf '%s\n' "$t"
        return 0
    fi
    [[ -n $TMP_DIR ]] || TMP_DIR=$(mktemp -d "$DEPS/tmp.XXXXXX")
    fetch_criu_orig "$TMP_DIR/dl" "$suite" "$spec" "$want" || return 1
    shopt -s nullglob
    got=("$TMP_DIR"/dl/criu_*.orig.tar.*)
    shopt -u nullglob
    ((${#got[@]} == 1)) || die "expected one criu_*.orig.tar.* after download, got ${#got[@]}"
    mkdir -p "$CRIU_SRC_ROOT"
    t="$CRIU_SRC_ROOT/$(basename -- "${got[0]}")"
    mv -f -- "${got[0]}" "$t"
    printf '%s\n' "$t"
}

# The CRIU this step builds when there is no good system CRIU: the source
# package CRIU_SOURCE_SPEC of Debian CRIU_SUITE, of upstream version
# CRIU_WANT_VERSION when one is asked for (any version >= CRIU_MIN_VERSION
# otherwise), else whatever CRIU_FALLBACK_SUITE has. The default is
# unstable's (4.2.1): experimental's 4.3 passed the whole suite here but
# restored no faster (NOTES.md section 6), and its source was not served by
# the mirror. A cached build older than an asked-for version is replaced
# once that version can be fetched. An unfetchable version is retried at
# most once a day (WANT_UNAVAILABLE_MARK), so a mirror without it costs one
# index download a day, not one per run.
CRIU_SUITE=${MIEHISTO_CRIU_SUITE:-unstable}
CRIU_WANT_VERSION=${MIEHISTO_CRIU_VERSION:-}
CRIU_SOURCE_SPEC=${MIEHISTO_CRIU_SOURCE:-criu}
CRIU_FALLBACK_SUITE=unstable
WANT_UNAVAILABLE_MARK="$DEPS/criu-$CRIU_SUITE-${CRIU_WANT_VERSION:-any}.unavailable"

want_recently_unavailable() { [[ -n $(find "$WANT_UNAVAILABLE_MARK" -mmin -1440 2>/dev/null) ]]; }

# Prints a pristine tree of the wanted CRIU, fetching and unpacking it when
# needed; returns 1 (and marks it unavailable for a day) when that fails.
wanted_tree() {
    local t
    if ! t=$(obtain_tarball "$CRIU_SUITE" "$CRIU_SOURCE_SPEC" "$CRIU_WANT_VERSION"); then
        touch "$WANT_UNAVAILABLE_MARK"
        warn "CRIU ${CRIU_WANT_VERSION:-source} is not available from Debian $CRIU_SUITE here; retrying tomorrow (delete $WANT_UNAVAILABLE_MARK to retry now)"
        return 1
    fi
    rm -f -- "$WANT_UNAVAILABLE_MARK"
    unpack_pristine "$t"
}

# Sets CRIU_PATH/CRIU_ORIGIN to a usable criu, building one if needed.
CRIU_PATH=""
CRIU_ORIGIN=""
ensure_criu() {
    local c tarball src cached_version

    # An explicit choice wins, but must be good: silently ignoring it would
    # hide a broken patched CRIU.
    if [[ -n ${MIEHISTO_CRIU:-} ]]; then
        criu_usable "$MIEHISTO_CRIU" ||
            die "MIEHISTO_CRIU=$MIEHISTO_CRIU is unusable: $CRIU_REASON; fix it or unset MIEHISTO_CRIU"
        CRIU_PATH=$(realpath -- "$MIEHISTO_CRIU")
        CRIU_ORIGIN="from MIEHISTO_CRIU"
        return
    fi

    # A system criu is preferred when it is good enough. /usr/sbin may not
    # be on PATH, so look there too; each binary is tried once.
    local -A seen=()
    for c in "$(command -v criu || true)" /usr/sbin/criu /usr/local/sbin/criu; do
        [[ -n $c && -e $c ]] || continue
        c=$(realpath -- "$c")
        [[ -z ${seen[$c]:-} ]] || continue
        seen[$c]=1
        if criu_usable "$c"; then
            CRIU_PATH=$c
            CRIU_ORIGIN="system"
            return
        fi
        log "not using system criu $c: $CRIU_REASON"
    done

    # Cache: a previous build that still passes, unless it is older than
    # the wanted version and that version may be fetchable now (then it is
    # replaced by a build of the wanted one, or kept when that fails).
    if criu_usable "$CRIU_BUILT"; then
        cached_version=$CRIU_VERSION
        if [[ -n $CRIU_WANT_VERSION ]] && ! version_ge "$cached_version" "$CRIU_WANT_VERSION" &&
            ! want_recently_unavailable; then
            log "cached CRIU $cached_version is older than $CRIU_WANT_VERSION: trying to build $CRIU_WANT_VERSION from Debian $CRIU_SUITE"
            TMP_DIR=${TMP_DIR:-$(mktemp -d "$DEPS/tmp.XXXXXX")}
            mkdir -p "$CRIU_SRC_ROOT"
            if src=$(wanted_tree); then
                if build_criu "$src"; then
                    record_criu_build "$src"
                    CRIU_PATH=$CRIU_BUILT
                    CRIU_ORIGIN="built from Debian $CRIU_SUITE's source package, replacing $cached_version"
                    return
                fi
                warn "keeping CRIU $cached_version: $CRIU_REASON"
                touch "$WANT_UNAVAILABLE_MARK"
            fi
            criu_usable "$CRIU_BUILT" || die "the cached CRIU stopped passing its checks: $CRIU_REASON"
        fi
        src=$(cat -- "$CRIU_PREFIX/SOURCE_DIR" 2>/dev/null || true)
        # Keep the pristine tree available for patching even if someone
        # deleted it (or moved the clone); the tarball is kept next to it.
        if [[ ! -d $src ]]; then
            tarball=$(kept_tarball "$CRIU_VERSION")
            if [[ -n $tarball ]]; then
                TMP_DIR=${TMP_DIR:-$(mktemp -d "$DEPS/tmp.XXXXXX")}
                src=$(unpack_pristine "$tarball")
            fi
        fi
        [[ -d $src ]] || warn "CRIU source tree is missing; delete $CRIU_PREFIX and re-run to get it back"
        record_criu_build "$src"
        CRIU_PATH=$CRIU_BUILT
        CRIU_ORIGIN="cached build"
        return
    fi
    [[ ! -e $CRIU_BUILT ]] || log "rebuilding: $CRIU_BUILT is unusable: $CRIU_REASON"

    TMP_DIR=${TMP_DIR:-$(mktemp -d "$DEPS/tmp.XXXXXX")}
    mkdir -p "$CRIU_SRC_ROOT"
    if ! want_recently_unavailable && src=$(wanted_tree); then
        if build_criu "$src"; then
            record_criu_build "$src"
            CRIU_PATH=$CRIU_BUILT
            CRIU_ORIGIN="built from Debian $CRIU_SUITE's source package"
            return
        fi
        # The same source again would fail the same way.
        [[ -n $CRIU_WANT_VERSION || $CRIU_SUITE != "$CRIU_FALLBACK_SUITE" ]] || die "$CRIU_REASON"
        warn "falling back to Debian $CRIU_FALLBACK_SUITE's CRIU: $CRIU_REASON"
        touch "$WANT_UNAVAILABLE_MARK"
    fi
    tarball=$(obtain_tarball "$CRIU_FALLBACK_SUITE" criu "" "$CRIU_WANT_VERSION") ||
        die "no CRIU source from Debian $CRIU_SUITE or $CRIU_FALLBACK_SUITE: check the network, or set MIEHISTO_DEBIAN_MIRROR / MIEHISTO_CRIU_SUITE / MIEHISTO_CRIU_VERSION"
    src=$(unpack_pristine "$tarball")
    build_criu "$src" || die "$CRIU_REASON"
    record_criu_build "$src"
    CRIU_PATH=$CRIU_BUILT
    CRIU_ORIGIN="built from Debian $CRIU_FALLBACK_SUITE's source package"
}

# Pristine-tree mode, for seize-patch/build.sh (its series is pinned to one
# CRIU version, which need not be the one this step builds): prints the
# path of an unpacked pristine tree of upstream version $1, fetching it from
# Debian CRIU_SUITE or CRIU_FALLBACK_SUITE when it is not kept. Touches
# neither packages nor the built CRIU.
pristine_tree_only() {
    local want=$1 t="" suite
    TMP_DIR=$(mktemp -d "$DEPS/tmp.XXXXXX")
    mkdir -p "$CRIU_SRC_ROOT"
    if [[ -f $CRIU_SRC_ROOT/criu-$want/Makefile.versions ]]; then
        printf '%s\n' "$CRIU_SRC_ROOT/criu-$want"
        return
    fi
    for suite in "$CRIU_SUITE" "$CRIU_FALLBACK_SUITE"; do
        t=$(obtain_tarball "$suite" criu "$want") && break
        t=""
    done
    [[ -n $t ]] || die "no CRIU $want source tarball in Debian $CRIU_SUITE or $CRIU_FALLBACK_SUITE: point MIEHISTO_CRIU_SOURCE_DIR at an unpacked criu-$want tree"
    unpack_pristine "$t"
}

# ------------------------------------------------------------------ output --

write_env() {
    local tmp="$DEPS/env.sh.tmp"
    {
        echo "# Generated by setup/install.sh; re-run it instead of editing."
        printf 'export MIEHISTO_CRIU=%q\n' "$CRIU_PATH"
        printf 'export MIEHISTO_PYTHON=%q\n' /usr/bin/python3
    } >"$tmp"
    mv -f -- "$tmp" "$DEPS/env.sh"
}

summary() {
    local go
    printf '%-11s %s (%s, %s)\n' "criu:" "$CRIU_PATH" "$CRIU_VERSION" "$CRIU_ORIGIN"
    printf '%-11s %s\n' "libseccomp:" "$(pkg-config --modversion libseccomp 2>/dev/null || echo 'not found by pkg-config')"
    printf '%-11s %s (%s)\n' "python3:" /usr/bin/python3 "$(/usr/bin/python3 --version 2>&1)"
    printf '%-11s %s (%s)\n' "wrk:" "$(command -v wrk || echo missing)" "$(dpkg-query -W -f='${Version}' wrk 2>/dev/null || true)"
    go=$(command -v go || true)
    if [[ -n $go ]]; then
        printf '%-11s %s (%s)\n' "go:" "$go" "$("$go" version 2>/dev/null || echo '?')"
    fi
    printf '%-11s %s\n' "env:" "$DEPS/env.sh"
}

if [[ ${1:-} == --pristine-tree ]]; then
    [[ -n ${2:-} ]] || die "usage: setup/install.sh --pristine-tree VERSION"
    pristine_tree_only "$2"
    exit 0
fi

ensure_packages
install_sshd_quietly
install_registry_quietly
ensure_criu
write_env
summary
# The benchmark workloads (Django, Express) into git-ignored folders.
bash "$SCRIPT_DIR/workloads.sh"
