"""What adkit says on stderr while it works: lines, warnings and progress bars (rank 0 only under torchrun).
Result tables are drawn by ``adkit.outputs.render``."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from adkit.core import distributed

# messages and progress go to stderr, tables to stdout
stderr = Console(stderr=True)


def say(message: str) -> None:
    """A line for the user on stderr (plain text: square brackets are shown, not read as markup)."""
    stderr.print(escape(message))


def warn(message: str) -> None:
    say(f"warning: {message}")


# False in the worker processes of a run that trains categories side by side: their parent shows the progress
_bars = {"shown": True}


def show_progress(shown: bool) -> None:
    _bars["shown"] = shown


def progress() -> Progress:
    """A progress bar with a free ``info`` field; shown by rank 0 only under torchrun, and not in a run's
    category workers."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=stderr, transient=False, disable=distributed.process_rank() != 0 or not _bars["shown"])
