"""Errors a user can cause. The CLI prints them as one line and exits non-zero; everything else is a bug."""

from __future__ import annotations

import click


class AdkitError(click.ClickException):
    """A user error (bad name, parameter, path, image or config), shown without a traceback."""

    exit_code = 2
