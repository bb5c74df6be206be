"""Library of the fetal brain MONAI Label app (datastore, infer/train tasks, strategies, model store, exchange)."""
