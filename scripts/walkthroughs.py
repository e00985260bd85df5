#!/usr/bin/env python3
"""Check or regenerate the walkthroughs (docs/walkthroughs/*.md) on real labs, as root:

    scripts/walkthroughs.py check docs/walkthroughs/*.md        # exit 3 and a diff when one differs
    scripts/walkthroughs.py regenerate docs/walkthroughs/*.md   # write what the commands print now

It runs with the checkout's virtualenv (.venv, made by scripts/setup.sh) when there is one.
The work is dataplane/walkthroughrun.py's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"

if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])  # the venv has l7lab's dependencies
# Run as a file, Python puts scripts/ on the path, not the checkout this script belongs to.
sys.path.insert(0, str(REPO))

from dataplane.walkthroughrun import main  # noqa: E402 - after the path is set

if __name__ == "__main__":
    sys.exit(main())
