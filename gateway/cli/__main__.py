"""`python -m devid.gateway.cli`."""

import sys

from devid.gateway.cli.dispatch import main

sys.exit(main())
