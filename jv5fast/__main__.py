"""``python -m jv5fast``: the ``jv5fast`` command."""
import sys

from .cli import main

sys.exit(main())
