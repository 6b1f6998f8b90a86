"""``python -m knowpress.cli``: the ``compress`` command."""

import sys

from knowpress.cli.app import main

sys.exit(main())
