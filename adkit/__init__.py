"""adkit: plugin-based industrial image anomaly detection.

Plugin authors import ``hookimpl`` from here; see docs/plugins.md.
"""

from adkit.core.hookspecs import hookimpl

__all__ = ["PLUGIN_API", "PLUGIN_API_SINCE", "hookimpl"]
__version__ = "0.3.0"

# The plugin API: the hooks and the component contracts of docs/plugins.md. It changes number only when a change
# would break a plugin written against it (the changelog in docs/plugins.md lists every change). A plugin may set
# ADKIT_PLUGIN_API in its module; the catalog refuses a plugin written for another number.
PLUGIN_API = 3
PLUGIN_API_SINCE = "0.3"  # the first adkit release with this plugin API: plugins pin adkit>=PLUGIN_API_SINCE
