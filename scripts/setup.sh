#!/usr/bin/env bash
# Install what sanvisor needs on a fresh Debian 12 machine (idempotent, fast when done):
# Debian packages, the Python environment (.venv), the data-path engine, and the guest kit.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(qemu-system-x86 qemu-utils busybox-static iproute2 nftables libnbd-bin iputils-ping fio multipath-tools lvm2
      gcc make libc6-dev etcd-server)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing packages ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # etcd-server's package starts a system etcd on :2379; sanvisor starts its own
    # (the store tests, a pool's members), so the one we just installed is stopped
    if [[ " ${missing[*]} " == *" etcd-server "* ]] && command -v systemctl >/dev/null; then
        systemctl disable --now etcd >/dev/null 2>&1 || true
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.sanvisor-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    echo "setup: installing the Python environment" >&2
    .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
    touch "$stamp"
fi

# Byte-compile the package: where PYTHONDONTWRITEBYTECODE is set (as on these machines),
# Python would compile every module again at every CLI call (~10 ms each time).
.venv/bin/python -m compileall -q src/sanvisor

# The data-path engine (engine/, C, no dependency beyond libc): build/engine/sanvisor-engine,
# where the agent looks for it. make rebuilds it only when a source changed (~3 s when it does).
make -s -C engine OUT="$PWD/build/engine"

# The guests' QEMU: where the system's is Debian 12's 7.2 (it corrupts about one TCG guest
# in ten that it migrates live), QEMU 10 from bookworm-backports, unpacked in build/qemu
# with a private apt state (the system's QEMU and apt sources stay as they are).
./scripts/fetch-qemu.sh

# The guest kit (Debian kernel + busybox initramfs): built once, cached.
.venv/bin/sanvisor guest-kit build >/dev/null
