"""Strategies built into sentinel-core, registered as plugins from DEFAULT_PLUGINS."""
