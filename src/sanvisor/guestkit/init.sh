#!/bin/sh
# sanvisor guest /init (busybox sh as PID 1). Kernel command line:
#   sv.ip0=10.0.0.2/24 [sv.ip1=...] [sv.gw=10.0.0.1] [sv.hostname=NAME]
#   [sv.console=plain]  (console shell without echo/line editing)
#   [root=DEV [rootfstype=T] [rootflags=O] [ro|rw]]  mounted on /mnt/root (sv-root)
# Services: TCP echo on 7, counter on 8000 (ticks every 0.1 s), status on 8001.
# Prints "SANVISOR-READY <hostname>" on the console, then a root shell there forever.
export PATH=/sbin:/bin HOME=/root TERM=vt100 PS1='# '
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
dmesg -n 1

# Hot-added memory goes online (movable when possible, so it can be unplugged again).
m=/sys/devices/system/memory/auto_online_blocks
[ -w $m ] && { echo online_movable > $m || echo online > $m; } 2>/dev/null

# Modules, in dependency order (written by the kit builder).
while read -r mod; do
    case $mod in xen_*) [ -d /sys/bus/xen/devices ] || continue ;; esac  # not on Xen
    insmod /lib/modules/$mod.ko || echo "sanvisor-init: insmod $mod failed"
done < /lib/modules/load.order

# Hotplug: online hot-added CPUs and memory blocks.
if [ -e /proc/sys/kernel/hotplug ]; then
    echo /sbin/hotplug > /proc/sys/kernel/hotplug
else
    uevent /sbin/hotplug </dev/null >/dev/null 2>&1 &
fi
for f in /sys/devices/system/cpu/cpu[0-9]*/online; do
    [ -e "$f" ] && read -r v < "$f" && [ "$v" = 0 ] && echo 1 > "$f"
done 2>/dev/null
for f in /sys/devices/system/memory/memory*/state; do
    [ -e "$f" ] && read -r v < "$f" && [ "$v" = offline ] && echo online > "$f"
done 2>/dev/null

# Power button (ACPI, via the button+evdev modules) -> clean poweroff.
acpid -c /etc/acpi -l /run/acpid.log

# Network and hostname from the kernel command line.
host=guest
gw=
console=
root= rootfstype= rootflags= rootmode=ro
read -r cmdline < /proc/cmdline
ip link set lo up
set -f
for arg in $cmdline; do
    case $arg in
        sv.hostname=*) host=${arg#sv.hostname=} ;;
        sv.gw=*) gw=${arg#sv.gw=} ;;
        sv.console=*) console=${arg#sv.console=} ;;
        root=*) root=${arg#root=} ;;
        rootfstype=*) rootfstype=${arg#rootfstype=} ;;
        rootflags=*) rootflags=${arg#rootflags=} ;;
        ro|rw) rootmode=$arg ;;
        sv.ip[0-9]*=*)
            key=${arg%%=*}
            dev=eth${key#sv.ip}
            ip addr add "${arg#*=}" dev "$dev" && ip link set "$dev" up
            ;;
    esac
done
set +f
[ -n "$gw" ] && ip route add default via "$gw"
hostname "$host"
echo "$host" > /etc/hostname
echo "127.0.0.1 localhost $host" > /etc/hosts

# The root= filesystem, when one is named: on /mnt/root (the kit stays in its initramfs).
[ -n "$root" ] && /sbin/sv-root "$root" "$rootfstype" "$rootflags" "$rootmode"

# Services.
echo 0 > /run/counter
(
    n=0
    while :; do
        sleep 0.1
        n=$((n + 1))
        # a new file renamed over the old: a reader never sees it empty (truncated)
        echo $n > /run/.counter && mv -f /run/.counter /run/counter
    done
) </dev/null >/dev/null 2>&1 &
nc -ll -p 7 -e cat </dev/null >/dev/null 2>&1 &
nc -ll -p 8000 -e /sbin/sv-counter </dev/null >/dev/null 2>&1 &
nc -ll -p 8001 -e /sbin/sv-status </dev/null >/dev/null 2>&1 &
/sbin/sv-ctl </dev/null >/dev/null 2>&1 &

echo "SANVISOR-READY $host"
# sv.console=plain: no tty echo and no line editing (clean output for scripts).
shell="exec sh -l"
[ "$console" = plain ] && shell="stty -echo; exec sh -l"
(
    while :; do
        setsid cttyhack sh -c "$shell"
        sleep 0.2
    done
) &
# busybox poweroff/reboot/halt (without -f) signal PID 1: USR2, TERM, USR1.
trap 'exec /sbin/poweroff' USR2
trap 'exec /sbin/reboot' TERM
trap 'exec /sbin/halt' USR1
while :; do
    wait
    sleep 1
done
