"""Front ends of fetal-fl that MONAI Label (and other servers) load: ``apps.fetal_brain`` is the MONAI Label app."""
