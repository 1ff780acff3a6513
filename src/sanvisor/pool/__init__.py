"""The pool: the hosts that share the SAN, their agents, and what spans them
(cross-host checks, pool-wide views, migration between hosts)."""
