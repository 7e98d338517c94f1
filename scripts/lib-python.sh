# Sourced by scripts/demo and scripts/test: make a venv, installing Debian's python3-venv first
# when this is a fresh Debian machine that lacks it (root only; otherwise say what to install).
ensure_venv() {
    local venv=$1
    if [ -x "$venv/bin/python" ]; then return 0; fi
    if ! python3 -c 'import ensurepip' 2>/dev/null; then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
            echo "installing python3-venv (python3 -m venv needs it on Debian)" >&2
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        else
            echo "python3 -m venv needs Debian's python3-venv: sudo apt-get install python3-venv" >&2
            exit 1
        fi
    fi
    python3 -m venv "$venv"
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    "$venv/bin/python" -m pip install -q -U pip setuptools wheel
}
