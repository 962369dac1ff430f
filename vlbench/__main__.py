"""``python -m vlbench`` is the ``vlbench`` command."""

import sys

from .cli import main

sys.exit(main())
