"""The ``fetal-fl`` command: one entry point composing the sub-commands of every part of the project."""
