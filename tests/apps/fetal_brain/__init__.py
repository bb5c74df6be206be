"""Tests of the fetal brain MONAI Label app (unit tests and a real server over HTTP)."""
