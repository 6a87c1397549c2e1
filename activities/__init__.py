"""All of kiln's I/O: one module per build step, each a thin activity over a ``Cloud``."""
