"""The host agent's HTTP API (served on a unix socket) and its typed client."""
