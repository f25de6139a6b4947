"""A/B evaluation: base vs rag vs ft vs rag+ft, offline (paired 2x2) and online (blind arena)."""
