"""``python -m starter`` runs the ``kiln`` command line."""

from starter.cli import main

main()
