"""`python -m dataplane.cli`: the l7lab command, as the `l7lab` entry point runs it."""

import sys

from . import main

sys.exit(main())
