#!/bin/sh
# /sbin/sv-counter: TCP port 8000 answers with the counter value and closes.
read -r v < /run/counter
[ -n "$v" ] || { usleep 2000; read -r v < /run/counter; }
echo "$v"
