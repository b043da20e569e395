"""``rmserve train``: a Bradley-Terry reward model from preference pairs, written as a served bundle.

The loop is the transformers ``Trainer`` with a pairwise loss: each batch holds B chosen and B
rejected sequences, the model (``rmserve.models.heads.ScoreModel``, the very function the exporter
traces) scores all 2B rows, and the loss is ``-logsigmoid(r_chosen - r_rejected - margin)``
(optionally label-smoothed) plus an optional reward-centering term ``coef * (r_chosen + r_rejected)^2``.
``--soup N`` trains N members from the same initial weights, each with its own data order and
dropout seed, and ships the uniform average of their weights (a "model soup": one model, the cost
of one at inference; on HH with MiniLM it measured no better than its members' mean, see the
default model's card). ``--export-only`` exports a checkpoint trained earlier (on a GPU machine,
say) with its recorded recipe.

The stages, one module each: ``config`` (the recipe and what a run returns), ``model`` (the base
checkpoint with a fresh head), ``batches`` (token ids from the server's own ``Formatter``, so
training truncates exactly as serving does), ``loop`` (the Trainer, one run or a soup), ``ship``
(checkpoint, training record, export, measurement) and ``command`` (the flags).
"""
