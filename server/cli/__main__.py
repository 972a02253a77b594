"""``python -m server.cli``: the ``fedrec`` command line."""

import sys

from server.cli import main

sys.exit(main())
