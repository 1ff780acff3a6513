#!/bin/sh
# /sbin/sv-ctl: the guest end of the host agent's control channel, a virtio-serial
# port named org.sanvisor.ctl. One request a line, one answer a line:
#   vcpus N   put vCPUs 0..N-1 online and the others offline (as Xen's vcpu-set asks a
#             PV guest); answers "ok <online cpus>"
#   ping      answers "ok pong"
#   sysrq K   the magic SysRq key K, as Xen's control/sysrq node asks a PV guest;
#             answers "ok K" first (b reboots at once, c crashes)
dev=
for p in /sys/class/virtio-ports/*; do
    read -r name < "$p/name" 2>/dev/null || continue
    [ "$name" = org.sanvisor.ctl ] && dev=/dev/${p##*/}
done
[ -n "$dev" ] || exit 0
exec 3<> "$dev"
while :; do
    if ! read -r cmd arg <&3; then
        sleep 0.5  # nobody at the host end: the port reads as end-of-file
        continue
    fi
    case $cmd in
        vcpus)
            for c in /sys/devices/system/cpu/cpu[0-9]*; do
                n=${c##*/cpu}
                [ "$n" = 0 ] && continue
                [ -e "$c/online" ] || continue
                if [ "$n" -lt "$arg" ]; then echo 1 > "$c/online"; else echo 0 > "$c/online"; fi
            done 2>/dev/null
            read -r online < /sys/devices/system/cpu/online
            echo "ok $online" >&3
            ;;
        ping) echo "ok pong" >&3 ;;
        sysrq)
            case $arg in
                [0-9a-z])
                    echo "ok $arg" >&3
                    echo "$arg" > /proc/sysrq-trigger
                    ;;
                *) echo "error not a sysrq key: $arg" >&3 ;;
            esac
            ;;
        *) echo "error unknown request $cmd" >&3 ;;
    esac
done
