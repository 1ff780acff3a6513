#!/bin/sh
# /etc/acpi/PWRF/00000080: busybox acpid runs this on the ACPI power button.
echo "sanvisor: power button, powering off" > /dev/console
exec /sbin/poweroff
