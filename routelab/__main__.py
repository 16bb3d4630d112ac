"""``python -m routelab``: the ``routelab`` command (the same as the console script).

The command line lives in ``analysis.cli`` (analysis sits above routelab); this entry
point is the one routelab module allowed to import it (tests/test_layering.py).
"""

import sys

from analysis.cli import main

sys.exit(main())
