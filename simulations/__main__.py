"""``python -m fedsynth.simulations`` runs the fedsynth CLI."""

from fedsynth.simulations.cli import main

main()
