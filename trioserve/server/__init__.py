"""The HTTP server coupling: Hypercorn settings and overrides, the accept-time listener."""
