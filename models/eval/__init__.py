"""``rmserve eval``: score preference eval sets, in process or through a running rmserve.

A run walks the stages of this package, one module each:

* ``rows``: DATA files -> rows (preference pairs in the three shapes of ``rmserve.models.data``,
  best-of-N rows in RewardBench-2's shape, plain prompt/response rows), and the bad rows with file and
  line; every row has a key, the first 16 hex digits of its data file's sha256 and its row number;
* ``scorers``: chunks of rows -> score records, by the server's own Formatter and engine in process
  or by the HTTP client through a running rmserve;
* ``store``: ``--out``'s ``scores.jsonl``, appended and flushed chunk by chunk, so a killed run
  continues where it stopped and no row is sent to the model twice, and ``run.json``, which pins the
  model that scored them;
* ``summary``: what the scores say (accuracy per file and subset, RewardBench weighting, statistics);
* ``render``: ``summary.json``, the PNG plots, ``report.md`` and the console lines;
* ``command``: the flags, and the run that joins the stages.

``pairs`` is the training side's short path (pairwise accuracy of a bundle on preference pairs,
used by ``rmserve train``). Bad rows are never dropped silently: each is reported with its file and
line, counted in the summary, listed in ``bad_rows.jsonl``; ``--strict`` stops at the first one.
"""
