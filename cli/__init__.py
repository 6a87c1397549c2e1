"""The ``kiln`` command line: start, watch, inspect and cancel image builds running on Temporal."""
