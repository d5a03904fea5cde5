"""Command-line tools behind ``python -m mmkernels``."""
