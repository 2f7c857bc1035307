"""KVzap: a small per-layer model that predicts kvzip's score of each KV
from the KV itself, so the ``kvzap`` policy ranks like kvzip without
re-reading the context (``train_scorer`` fits it from kvzip's own pass)."""
