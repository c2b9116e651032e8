"""The host side: the SQLite state store (``store``), which daemon is running (``running``),
proving a process's identity (``identity``), killing proven process groups (``groupkill``),
finding and killing a dead daemon's leftovers (``cleanup``), sd_notify (``notify``)."""
