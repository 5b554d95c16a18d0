"""Data files shipped with hpcvae (see each folder's README for its origin and licence)."""
