#!/usr/bin/env bash
# The guests' QEMU: Debian 12's QEMU 7.2 corrupts about one TCG guest in ten that it
# migrates live (docs/migration.md, "QEMU 7.2 and live migration"); QEMU 10 from
# bookworm-backports does not. Its packages are downloaded with a private apt state
# (the system's sources and installed QEMU are left alone) and unpacked in build/qemu;
# build/qemu/bin/qemu-system-x86_64 runs it with its own data directory. The agent's
# QEMU driver uses it when present (SANVISOR_QEMU overrides; docs/migration.md).
# Skipped when the system's QEMU is 8 or newer, or when SANVISOR_QEMU is set.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$PWD/build/qemu
PKGS=(qemu-system-x86 qemu-system-common qemu-system-data)

if [ -n "${SANVISOR_QEMU:-}" ]; then exit 0; fi
major=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p')
if [ -n "$major" ] && [ "$major" -ge 8 ]; then exit 0; fi
if [ -x "$out/bin/qemu-system-x86_64" ] && "$out/bin/qemu-system-x86_64" --version >/dev/null 2>&1; then
    exit 0
fi

echo "setup: fetching QEMU from bookworm-backports for the guests (Debian 12's 7.2 corrupts live-migrated TCG guests)" >&2
rm -rf "$out.tmp" && mkdir -p "$out.tmp/apt/lists/partial" "$out.tmp/apt/cache/archives/partial" "$out.tmp/debs"
mirror=$(sed -n 's/^URIs: *\(http[^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
echo "deb ${mirror:-http://deb.debian.org/debian} bookworm-backports main" > "$out.tmp/apt/sources.list"
APT=(apt-get -q -o "Dir::Etc::SourceList=$out.tmp/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$out.tmp/apt/lists" -o "Dir::Cache=$out.tmp/apt/cache"
     -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root)
"${APT[@]}" update >/dev/null
(cd "$out.tmp/debs" && "${APT[@]}" download "${PKGS[@]/%//bookworm-backports}" >/dev/null)
for deb in "$out.tmp"/debs/*.deb; do dpkg-deb -x "$deb" "$out.tmp/root"; done

# one data directory: QEMU 10's own files, then the system's firmware (SeaBIOS, iPXE
# option ROMs) for the names it does not ship
mkdir -p "$out.tmp/share" "$out.tmp/bin"
cp -a "$out.tmp/root/usr/share/qemu/." "$out.tmp/share/"
for f in /usr/share/qemu/*; do
    name=$(basename "$f")
    [ -e "$out.tmp/share/$name" ] || ln -s "$(readlink -f "$f")" "$out.tmp/share/$name"
done
cat > "$out.tmp/bin/qemu-system-x86_64" <<'WRAP'
#!/bin/sh
here=$(dirname "$(dirname "$(readlink -f "$0")")")
exec "$here/root/usr/bin/qemu-system-x86_64" -L "$here/share" "$@"
WRAP
chmod +x "$out.tmp/bin/qemu-system-x86_64"
"$out.tmp/bin/qemu-system-x86_64" --version | head -1 >&2
rm -rf "$out.tmp/apt" "$out.tmp/debs" "$out"
mv "$out.tmp" "$out"
