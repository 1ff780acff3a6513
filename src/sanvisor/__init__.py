"""sanvisor: the xm experience over a pool of hypervisor hosts on shared SAN storage."""

__version__ = "0.1.0"
