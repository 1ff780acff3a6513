"""The host agent: one daemon per hypervisor host (dom0's role)."""
