#!/bin/sh
# /sbin/poweroff, /sbin/reboot, /sbin/halt: sync, then do it at once (PID 1 is a shell).
sync
case ${0##*/} in
    reboot) exec busybox reboot -f ;;
    halt) exec busybox halt -f ;;
    *) exec busybox poweroff -f ;;
esac
