"""Launching the trainer where users already run jobs: Slurm, horovodrun hosts,
and federated rounds. `python -m launch --help`."""
