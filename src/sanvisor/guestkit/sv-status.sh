#!/bin/sh
# /sbin/sv-status: one status line (TCP port 8001, or run it from the shell).
read -r up _ < /proc/uptime
read -r online < /sys/devices/system/cpu/online
read -r counter < /run/counter
mem=0
while read -r key val _; do
    [ "$key" = MemTotal: ] && { mem=$val; break; }
done < /proc/meminfo
echo "hostname=$(hostname) uptime=$up cpus=$(nproc) cpus_online=$online memtotal_kb=$mem counter=$counter"
