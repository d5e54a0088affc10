"""adkit: plugin-based industrial image anomaly detection.

Plugin authors import ``hookimpl`` from here; see docs/plugins.md.
"""

from adkit.hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"
