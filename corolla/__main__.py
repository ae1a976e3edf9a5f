"""Allow ``python -m corolla``."""

import sys

from corolla.cli import main

sys.exit(main())
