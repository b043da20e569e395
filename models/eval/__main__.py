"""``python -m rmserve.models.eval``: the same as ``rmserve eval``."""

from rmserve.models.eval.command import main

raise SystemExit(main())
