"""An example adkit plugin: a per-pixel Gaussian detector, a clipping post-processor, a percentile scorer and a
command.

This module is what the entry point loads whenever adkit starts (even for ``adkit --help``): it holds only the hooks,
which import the components (and torch) when they run.
"""

from __future__ import annotations

import click

from adkit.plugin import hookimpl


@hookimpl
def register_detectors(register):
    from adkit_hello.components import PixelGaussian

    register("pixel-gauss", PixelGaussian)


@hookimpl
def register_postprocessors(register):
    from adkit_hello.components import Clip

    register("clip", Clip)


@hookimpl
def register_scorers(register):
    from adkit_hello.components import Percentile99

    register("p99", Percentile99)


@hookimpl
def register_commands(cli):
    @cli.command()
    def hello():
        """Say which components the hello plugin adds."""
        click.echo("adkit-hello-plugin: detector pixel-gauss, post-processor clip, scorer p99")
