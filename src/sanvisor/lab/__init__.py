"""The one-machine lab: the demo now; the SAN and the pool as they arrive."""
