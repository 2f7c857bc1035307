"""Choosing which KVs to evict (``planner``) and packing the survivors of each
head back into a prefix of its blocks (``compaction``), so that whole tail
blocks can be returned to the head-block pool."""
