"""``python -m vlbench`` is the ``vlbench`` command."""

import sys

from vlbench.cli import main

sys.exit(main())
