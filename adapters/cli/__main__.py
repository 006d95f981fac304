"""``python -m adapters.cli``: the ``conclave`` command."""

import sys

from adapters.cli.commands import main

sys.exit(main())
