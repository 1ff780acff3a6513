"""The QEMU driver: argv building, accelerator probe, QMP-driven instances."""
