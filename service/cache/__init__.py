"""The score cache: keys (``keys``), the in-process LRU (``memory``), Redis (``redis``, with its URL forms
in ``redis_url`` and its circuit breaker in ``breaker``) and ``factory``, which builds the one the
settings ask for (none when the cache is off). Identical items in flight at once share one forward
pass in ``rmserve.scoring``, not here."""
