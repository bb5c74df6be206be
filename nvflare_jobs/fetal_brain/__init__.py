"""The fetal brain segmentation job: ``model.py`` (the bundle's network), ``client.py`` (a site's round), ``job.py``."""
