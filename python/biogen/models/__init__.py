"""Models, one package per model family: ``scgpt``, ``scbert`` (single-cell; both built on ``singlecell``),
``rna_cdm``, ``pumamednet``, ``tumorsynth``. Each splits the network (tensors in, tensors out) from what
users call (an AnnData-facing class or training functions), checkpoint loading and its ``cli``."""
