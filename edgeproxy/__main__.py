"""`python -m edgeproxy` runs the proxy."""

import sys

from edgeproxy.cli import main

sys.exit(main())
