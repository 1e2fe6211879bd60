#!/usr/bin/env bash
# setup/demo.sh: set the machine up, build, and run `runmh demo` with this
# script's arguments.

set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd -P)
cd -- "$REPO_ROOT"

# Run install.sh as its own process so its traps and lock stay its own.
bash "$SCRIPT_DIR/install.sh"
# shellcheck source=/dev/null
. "$REPO_ROOT/.deps/env.sh"

# rustup installs cargo in ~/.cargo/bin, which a non-login shell may not
# have on PATH.
if ! command -v cargo >/dev/null && [[ -x ${CARGO_HOME:-$HOME/.cargo}/bin/cargo ]]; then
    PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
command -v cargo >/dev/null ||
    { echo "demo.sh: error: cargo not found: install Rust (rustup) or put cargo on PATH" >&2; exit 1; }

cargo build --release
exec "$REPO_ROOT/target/release/runmh" demo "$@"
