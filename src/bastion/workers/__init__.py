"""`bastion serve --workers N`: a master process, N gateway workers on one port (docs/operations.md)."""
