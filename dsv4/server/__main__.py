"""``python -m dsv4.server --model tiny --port 8000``: the same as ``dsv4 serve``."""

import sys

from dsv4.server.cli import main

sys.exit(main())
