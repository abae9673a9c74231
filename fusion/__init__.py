"""Fusion: streaming loaders, fusion models, training, evaluation and reports."""
