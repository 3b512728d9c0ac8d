"""amortize: contrastive language-image pretraining with amortized partition functions."""
__version__ = "0.1.0"
