"""Per-head paged attention over the head-block pool."""
