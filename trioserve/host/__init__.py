"""The host side: the SQLite state store, cleanup of leftovers, sd_notify."""
