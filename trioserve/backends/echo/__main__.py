"""``python -m trioserve.backends.echo``: how the config and the tests start the echo server."""

from trioserve.backends.echo.cli import main

if __name__ == "__main__":
    main()
