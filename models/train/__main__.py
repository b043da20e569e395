"""``python -m rmserve.models.train``: the same as ``rmserve train``."""

from rmserve.models.train.command import main

raise SystemExit(main())
