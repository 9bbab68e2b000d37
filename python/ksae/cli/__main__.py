"""``python -m ksae.cli COMMAND ...`` is ``ksae COMMAND ...``."""

import sys

from . import main

sys.exit(main())
