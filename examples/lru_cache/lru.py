class LRUCache:
    """A fixed-capacity cache that evicts the least recently used entry.

    get(key, default=None) returns the value and marks the key as recently used;
    put(key, value) inserts or updates, evicting the least recently used key when
    full; len(cache) is the number of entries; capacity must be >= 1 (ValueError).
    """

    def __init__(self, capacity):
        self.capacity = capacity
        self.data = {}

    def get(self, key, default=None):
        return self.data.get(key, default)

    def put(self, key, value):
        self.data[key] = value
