"""ragtune: rag layer."""
