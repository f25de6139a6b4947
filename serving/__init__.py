"""ragtune: serving layer."""
