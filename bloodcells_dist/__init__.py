"""bloodcells_dist: train a white-blood-cell classifier from WebDataset shards on CPU, one GPU or many."""

__version__ = "0.2.0"
