"""``python -m ecdcfs``: the ``ecdcfs`` command."""

from .cli import main

raise SystemExit(main())
