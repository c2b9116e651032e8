"""trioserve: many users, many local language models, one endpoint."""

__version__ = "0.1.0"

__all__ = ["__version__"]
