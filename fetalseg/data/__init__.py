"""Data: synthetic phantoms, site federations, FeTA/folder loaders and validation."""
