"""Encrypted inference: a clinic (data owner) gets a segmentation from the model owner's network without showing
its scan, and without seeing the model's weights.

Two-party secret sharing with CrypTen 0.4.1 (a separate dealer makes the Beaver triples); the bundle's network is
walked as built (:mod:`.layers`), the CrypTen compatibility shims live in :mod:`.shims`, the processes and their
handshake in :mod:`.protocol`, the commands in :mod:`.cli`. See docs/encrypted_inference.md for the security model.
"""
