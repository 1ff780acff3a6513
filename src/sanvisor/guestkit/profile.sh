# /etc/profile for the console root shell.
export PATH=/sbin:/bin HOME=/root TERM=vt100 PS1='# '
cd /root 2>/dev/null || cd /
