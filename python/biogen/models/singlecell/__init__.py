"""What the single-cell models (scGPT, scBERT) share: the AnnData-facing base class and the training loop."""
