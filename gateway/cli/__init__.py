"""The `devid` command line: `dispatch` builds the parser and dispatches; one module per command group."""

from devid.gateway.cli.dispatch import main

__all__ = ["main"]
