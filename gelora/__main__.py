"""``python -m gelora``: the ``gelora`` command (see :mod:`gelora.cli`)."""
import sys

from .cli import main

sys.exit(main())
