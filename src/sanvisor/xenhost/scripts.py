"""The dom0 side: ``/init`` and the command server ``/sbin/sv-xenctl`` (busybox sh).

See :mod:`sanvisor.xenhost.channel` for the wire protocol the server speaks on
``/dev/ttyS1`` (the nested QEMU's second serial port, which Xen leaves to dom0).
"""

from __future__ import annotations

READY_MARKER = "SANVISOR-XEN-READY"
CTL_TTY = "/dev/ttyS1"
XEN_BIN = "/usr/lib/xen-4.17/bin"

INIT = r"""#!/bin/busybox sh
# dom0 /init: mounts, Xen modules, xenstored, xen-init-dom0, xenconsoled, command server.
export PATH=@XEN_BIN@:/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
for d in /run /tmp /var/lib/xen /var/log; do mount -t tmpfs tmpfs "$d"; done
mkdir -p /run/xen /run/xenstored /var/lib/xenstored /var/log/xen/console /run/lock
while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "sv-init: insmod $m failed"
done < /lib/modules/load.order
mount -t xenfs xenfs /proc/xen
hostname "$(sed -n 's/.*sv\.hostname=\([^ ]*\).*/\1/p' /proc/cmdline)" 2>/dev/null
xenstored --pid-file=/run/xenstored.pid
xen-init-dom0
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
echo "@READY@ $(hostname)"
exec /sbin/sv-xenctl @CTL_TTY@
"""

SERVER = r"""#!/bin/sh
# sv-xenctl TTY: one request at a time, forever (protocol: sanvisor.xenhost.channel).
tty=$1
exec 3<>"$tty"
stty -F "$tty" raw -echo -ixon -ixoff
W=/tmp/sv-xenctl
mkdir -p $W
b64() { if [ -s "$1" ]; then base64 -w 0 "$1"; else printf -; fi; }
printf 'HELLO sv-xenctl 1\n' >&3
while read -r verb id limit nscript nin rest <&3; do
    [ "$verb" = REQ ] || continue
    head -c $((nscript + nin)) <&3 > $W/req
    head -c "$nscript" $W/req | base64 -d > $W/cmd
    tail -c +$((nscript + 1)) $W/req | base64 -d > $W/in
    timeout -s KILL "$limit" sh $W/cmd < $W/in > $W/out 2> $W/err
    rc=$?
    printf 'RSP %s %s %s %s END\n' "$id" "$rc" "$(b64 $W/out)" "$(b64 $W/err)" >&3
done
"""


def init_script() -> str:
    return (INIT.replace("@XEN_BIN@", XEN_BIN).replace("@READY@", READY_MARKER)
            .replace("@CTL_TTY@", CTL_TTY))
