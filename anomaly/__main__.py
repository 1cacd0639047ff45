"""``python -m anomaly`` runs the CLI."""

from anomaly.cli import main

main()
