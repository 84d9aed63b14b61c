"""``python -m xvol_compiler.cli``: the ``xvol`` command."""

import sys

from xvol_compiler.cli import main

sys.exit(main())
