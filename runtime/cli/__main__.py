"""``python -m threadbound.runtime.cli``: the ``threadbound`` command."""

import sys

from .main import main

sys.exit(main())
