"""raydist: train image classifiers with PyTorch DDP on a Ray cluster and search their hyperparameters."""

__version__ = "0.1.0"
