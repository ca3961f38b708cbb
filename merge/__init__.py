"""Merging trained models: FedAvg of models that share an initialization,
output ensembles of models that do not. `python -m merge --help`."""
