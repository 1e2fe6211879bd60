#!/usr/bin/env bash
# setup/test.sh: set the machine up, then build everything and run the tests.
# Used by CI (.ci/run) and by hand; exits non-zero on any failure.

set -euo pipefail

# ---- The test invocation (lead engineer: adjust here). --------------------
# One test thread: tests checkpoint/restore real processes and share CRIU,
# PID namespaces and ports, so they must not run concurrently.
TEST_CMD=(cargo test --release -- --test-threads=1)
# ---------------------------------------------------------------------------

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd -P)
cd -- "$REPO_ROOT"

# Run install.sh as its own process so its traps and lock stay its own.
bash "$SCRIPT_DIR/install.sh"
# The CRIU of seize-patch/ (the research rows that compare it need it;
# everything else uses the unpatched CRIU of .deps/env.sh).
bash "$REPO_ROOT/seize-patch/build.sh"
# shellcheck source=/dev/null
. "$REPO_ROOT/.deps/env.sh"
# shellcheck source=/dev/null
. "$REPO_ROOT/.deps/criu-patched/env.sh"

# rustup installs cargo in ~/.cargo/bin, which a non-login CI shell may not
# have on PATH.
if ! command -v cargo >/dev/null && [[ -x ${CARGO_HOME:-$HOME/.cargo}/bin/cargo ]]; then
    PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
command -v cargo >/dev/null ||
    { echo "test.sh: error: cargo not found: install Rust (rustup) or put cargo on PATH" >&2; exit 1; }

# The lint gates run before the tests: the tree must stay formatted
# (.rustfmt.toml) and clippy-clean (lints in Cargo.toml). Both tools are
# rustup components that a minimal toolchain may lack.
for tool in rustfmt clippy; do
    probe=(cargo fmt --version)
    [[ $tool == clippy ]] && probe=(cargo clippy --version)
    if ! "${probe[@]}" >/dev/null 2>&1; then
        command -v rustup >/dev/null ||
            { echo "test.sh: error: cargo $tool is missing and rustup is not available to add it: install the $tool component" >&2; exit 1; }
        echo "test.sh: rustup component add $tool" >&2
        rustup component add "$tool"
    fi
done
echo "test.sh: cargo fmt --check" >&2
cargo fmt --check ||
    { echo "test.sh: error: the tree is not formatted: run 'cargo fmt' and commit the result" >&2; exit 1; }
echo "test.sh: cargo clippy --release --all-targets -- -D warnings" >&2
cargo clippy --release --all-targets -- -D warnings

echo "test.sh: cargo build --release --all-targets" >&2
cargo build --release --all-targets
echo "test.sh: ${TEST_CMD[*]}" >&2
"${TEST_CMD[@]}"
