"""Tests of the front ends in apps/."""
