"""One file per way of scoring KVs (``base.Scorer``)."""
