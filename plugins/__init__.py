"""adkit's built-in plugins, registered through the ``adkit`` entry-point group like any third-party package."""
