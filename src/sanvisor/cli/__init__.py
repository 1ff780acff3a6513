"""`sanvisor <verb>`: argument parsing and rendering only."""
