"""amortize: contrastive language-image pretraining with amortized partition functions."""
__version__ = "0.2.0"
