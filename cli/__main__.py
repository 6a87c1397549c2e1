"""``python -m cli`` runs the ``kiln`` command line."""

from cli.main import main

main()
