"""The ``compress`` command (alias ``knowpress``): ``app.py`` dispatches, ``args.py`` parses,
one file per subcommand (``check``, ``eval``, ``export``, ``list``); ``quiet.py`` (``-q``) and
``interrupts.py`` (SIGTERM as Ctrl-C) serve them all."""

from knowpress.cli.app import main

__all__ = ["main"]
