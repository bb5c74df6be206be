"""The fetal brain MONAI Label app: serve the bundle's model, collect corrections, fine-tune, exchange models.

MONAI Label loads ``main.py`` by path; everything else lives in ``lib/`` (app logic), ``routes.py`` and
``server.py`` (the hardened ASGI front), and ``cli.py`` (``fetal-fl app ...`` sub-commands).
"""
