"""``python -m itae``: the same as the ``itae`` command."""
import sys

from itae.cli import main

sys.exit(main())
