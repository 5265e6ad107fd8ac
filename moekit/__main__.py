"""``python -m moekit``: the ``moekit`` command, also as torchrun's module (``torchrun -m moekit train``)."""

import sys

from moekit.cli import main

sys.exit(main())
