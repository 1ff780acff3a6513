#!/bin/sh
# /sbin/hotplug: run for every kernel uevent (busybox `uevent` or the uevent helper).
# Onlines hot-added CPUs and memory blocks.
[ "$ACTION" = add ] || [ "$ACTION" = online ] || exit 0
case $SUBSYSTEM in
    cpu)
        f=/sys$DEVPATH/online
        [ -w "$f" ] && read -r v < "$f" && [ "$v" = 0 ] && echo 1 > "$f"
        ;;
    memory)
        f=/sys$DEVPATH/state
        [ -w "$f" ] && read -r v < "$f" && [ "$v" = offline ] &&
            { echo online_movable > "$f" || echo online > "$f"; } 2>/dev/null
        ;;
esac
exit 0
