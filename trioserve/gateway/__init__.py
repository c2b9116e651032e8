"""The request side: the ASGI app, the relay to model processes, admission, admin API, metrics."""
