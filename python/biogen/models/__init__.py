"""Models: torch modules that take tensors, and user-facing classes that own AnnData."""
