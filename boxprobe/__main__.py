"""``python -m boxprobe``: the command line of :mod:`boxprobe.cli`."""

import sys

from boxprobe.cli import main

sys.exit(main())
