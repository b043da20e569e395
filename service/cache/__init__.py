"""The score cache: keys, an in-process LRU, Redis, and the single-flight of identical items."""
