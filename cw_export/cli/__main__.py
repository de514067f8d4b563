"""``python -m cw_export.cli``: the same as the ``cw-export`` command."""

import sys

from . import main

sys.exit(main())
