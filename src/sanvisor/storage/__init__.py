"""The storage network: the disk array (NBD), SAN discovery, multipath, volumes."""
