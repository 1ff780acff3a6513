"""dom0's ``/init``: mounts, Xen daemons, its LAN (``sv.lan=IP/PREFIX`` on its command
line: the NIC in ``xenbr0``, the address on the bridge), then the command server
(:mod:`sanvisor.xenhost.dom0server`) on the virtio-serial port named ``sanvisor.ctl``.
"""

from __future__ import annotations

from sanvisor.xenhost import pybundle

READY_MARKER = "SANVISOR-XEN-READY"
CTL_PORT_NAME = "sanvisor.ctl"
XEN_BIN = "/usr/lib/xen-4.17/bin"
#: dom0's address on the lab's LAN (``IP/PREFIX``), when it has one: see mignet.py
LAN_FILE = "/run/sv-lan"

INIT = r"""#!/bin/busybox sh
# dom0 /init: mounts, Xen modules, xenstored, xen-init-dom0, xenconsoled, command server.
export PATH=@XEN_BIN@:/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu
export HOME=/root PYTHONHOME=@PYTHON_HOME@ PYTHONPATH=@SERVER_PATH@ PYTHONDONTWRITEBYTECODE=1
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
port=
for _ in $(seq 100); do  # ports are announced by the device after the driver binds
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = @CTL_PORT@ ] && port=/dev/${p##*/}
    done
    [ -n "$port" ] && [ -e "$port" ] && break
    sleep 0.05
done
lan=$(sed -n 's/.*sv\.lan=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$lan" ]; then  # the host's NIC on the lab's LAN, in xenbr0 (the seed's bridging)
    nic=
    for _ in $(seq 100); do
        for n in /sys/class/net/*; do [ -e "$n/device" ] && nic=${n##*/}; done
        [ -n "$nic" ] && break
        sleep 0.05
    done
    brctl addbr xenbr0 && brctl setfd xenbr0 0 && brctl stp xenbr0 off
    ip link set "$nic" up && brctl addif xenbr0 "$nic" \
        && ip addr add "$lan" dev xenbr0 && ip link set xenbr0 up \
        && echo "$lan" > @LAN_FILE@ || echo "sv-init: no LAN (nic ${nic:-none})"
fi
echo "@READY@ $(hostname) ${port:-no-control-port}"
while true; do  # pid 1 must not exit: restart the server should it die
    @PYTHON_HOME@/bin/python3 -S @SERVER_PATH@/sanvisor/xenhost/dom0server.py "$port"
    echo "sv-init: command server exited with $?"
    sleep 1
done
"""

def init_script() -> str:
    return (INIT.replace("@XEN_BIN@", XEN_BIN).replace("@READY@", READY_MARKER)
            .replace("@CTL_PORT@", CTL_PORT_NAME).replace("@LAN_FILE@", LAN_FILE)
            .replace("@PYTHON_HOME@", pybundle.PYTHON_HOME)
            .replace("@SERVER_PATH@", pybundle.SERVER_PATH))


#: libxl runs these for every vif and every phy disk (Debian's are bash scripts and
#: dom0 has only busybox). Environment from libxl: XENBUS_PATH (the backend's
#: xenstore dir), vif (the backend interface name); argument: the action.
VIF_BRIDGE = r"""#!/bin/sh
# /etc/xen/scripts/vif-bridge (sanvisor, busybox): plug a vif into its bridge.
rd() { xenstore-read "$XENBUS_PATH/$1" 2>/dev/null; }
bridge=$(rd bridge); bridge=${bridge:-xenbr0}
case "$1" in
online|add)
    [ -d "/sys/class/net/$bridge" ] || { brctl addbr "$bridge" && ip link set "$bridge" up; }
    ip link set "$vif" up && brctl addif "$bridge" "$vif" || exit 1
    xenstore-write "$XENBUS_PATH/hotplug-status" connected ;;
offline|remove)
    brctl delif "$bridge" "$vif" 2>/dev/null
    ip link set "$vif" down 2>/dev/null ;;
esac
exit 0
"""

BLOCK = r"""#!/bin/sh
# /etc/xen/scripts/block (sanvisor, busybox): a phy disk's major:minor for blkback;
# a regular file goes through a loop device, as xm's file: disks did.
rd() { xenstore-read "$XENBUS_PATH/$1" 2>/dev/null; }
case "$1" in
add)
    dev=$(rd params)
    [ -e "$dev" ] || { echo "block: $dev: no such device" >&2; exit 1; }
    if [ -f "$dev" ]; then
        file=$dev; mode=$(rd mode); ro=; [ "$mode" = r ] && ro=-r
        for _ in 1 2 3 4 5; do  # another script may take the same free device
            dev=$(losetup -f) && losetup $ro "$dev" "$file" 2>/dev/null && break
            dev=
        done
        [ -n "$dev" ] || { echo "block: $file: no free loop device" >&2; exit 1; }
    fi
    [ -b "$dev" ] || { echo "block: $dev: not a block device" >&2; exit 1; }
    xenstore-write "$XENBUS_PATH/physical-device" "$(stat -L -c %t:%T "$dev")" \
        "$XENBUS_PATH/physical-device-path" "$dev" \
        "$XENBUS_PATH/hotplug-status" connected ;;
remove)
    dev=$(rd physical-device-path)
    case "$dev" in /dev/loop*) losetup -d "$dev" 2>/dev/null ;; esac ;;
esac
exit 0
"""

#: dom0 files sanvisor supplies in place of the packages' own.
OVERRIDES = {"etc/xen/scripts/vif-bridge": VIF_BRIDGE, "etc/xen/scripts/block": BLOCK}
