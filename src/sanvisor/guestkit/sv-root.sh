#!/bin/sh
# sv-root DEV FSTYPE FLAGS MODE: mount the root= filesystem on /mnt/root.
# The guest kit keeps running from its initramfs; this makes the disk a config calls
# root visible (and proves the guest found it). DEV: /dev/sdX[N], /dev/xvdX[N],
# /dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_<serial>[-partN] (made here, as udev names
# them: the kit has no udev), LABEL=... or UUID=.... Waits up to 10 s for it to appear.
# Writes "root=DEV dev=/dev/sdb fstype=ext4 mode=ro" to /run/sv-root.
dev=$1 fstype=$2 flags=$3 mode=${4:-ro}
say() { echo "sanvisor-init: root=$dev: $*"; }

by_id() {  # /dev/disk/by-id links for the SCSI disks, from their serial (VPD page 0x80)
    mkdir -p /dev/disk/by-id
    for b in /sys/block/sd*; do
        [ -r "$b/device/vpd_pg80" ] || continue
        serial=$(tail -c +5 "$b/device/vpd_pg80")
        [ -n "$serial" ] || continue
        n=${b##*/}
        ln -sf "../../$n" "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_$serial"
        for p in "$b/$n"[0-9]*; do
            [ -e "$p" ] && ln -sf "../../${p##*/}" \
                "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_$serial-part${p##*/$n}"
        done
    done
}

find_dev() {  # the block device DEV names now, or nothing
    case $dev in
        LABEL=*|UUID=*) findfs "$dev" 2>/dev/null ;;
        /dev/disk/by-id/*) by_id; [ -b "$dev" ] && readlink -f "$dev" ;;
        *) [ -b "$dev" ] && echo "$dev" ;;
    esac
}

case $dev in
    /dev/sd*|/dev/xvd*|/dev/vd*|/dev/hd*|/dev/disk/by-id/*|LABEL=*|UUID=*) ;;
    *) say "not a disk the guest kit can find (no LVM, no device-mapper): not mounted"
       exit 0 ;;
esac
while read -r mod; do
    insmod "/lib/modules/$mod.ko" || say "insmod $mod failed"
done < /lib/modules/fs.order
read -r up _ < /proc/uptime
end=$((${up%.*} + 10))
while ! real=$(find_dev) || [ -z "$real" ]; do
    read -r up _ < /proc/uptime
    if [ "${up%.*}" -ge "$end" ]; then
        say "no such device after 10 s: not mounted"
        exit 0
    fi
    sleep 0.05
done
mkdir -p /mnt/root
if ! mount ${fstype:+-t "$fstype"} -o "$mode${flags:+,$flags}" "$real" /mnt/root; then
    say "$real: mount failed: not mounted"
    exit 0
fi
type=$(awk '$2 == "/mnt/root" { print $3 }' /proc/mounts)
echo "root=$dev dev=$real fstype=$type mode=$mode" > /run/sv-root
say "$real ($type, $mode) mounted on /mnt/root"
