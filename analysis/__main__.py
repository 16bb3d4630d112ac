"""``python -m analysis``: the ``routelab`` command."""

import sys

from analysis.cli import main

sys.exit(main())
