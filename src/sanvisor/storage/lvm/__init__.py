"""Volumes on the SAN: LVM2's on-disk format, written and read by sanvisor itself
(docs/volumes.md): PV labels and metadata areas, the metadata text, allocation,
the pool-wide lease, snapshots' exception stores, and the LVM commands."""
