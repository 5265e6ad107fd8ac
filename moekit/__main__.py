"""``python -m moekit``: the command line, also as torchrun's module (``torchrun -m moekit train``)."""

import sys

from moekit.cli import main

sys.exit(main())
