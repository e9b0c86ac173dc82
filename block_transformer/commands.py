"""What every command-line tool shares: ``-h``/``--help`` and ``--version``, and library errors as one line
(logging is :mod:`block_transformer.logs`). Imports nothing heavy, so that every tool answers ``--help`` at once.

:mod:`block_transformer.cli` builds its commands with it, and so does
:mod:`block_transformer.uptrain.command` (``bt-uptrain``, also run as ``python -m block_transformer.uptrain``).
"""

from __future__ import annotations

import functools

import click

from . import __version__
from .errors import BlockTransformerError


def command(**kwargs):
    """A click command with ``-h``/``--help`` and ``--version``."""

    def decorate(fn):
        fn = click.version_option(__version__, prog_name="block-transformer")(fn)
        return click.command(context_settings={"help_option_names": ["-h", "--help"]}, **kwargs)(fn)

    return decorate


def friendly_errors(fn):
    """Turn BlockTransformerError into click's one-line ``Error: ...`` with exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BlockTransformerError as err:
            raise click.ClickException(str(err)) from err

    return wrapper
