"""``python -m trakjax``: the command line (see :mod:`trakjax.cli`)."""

import sys

from trakjax.cli import main

sys.exit(main())
