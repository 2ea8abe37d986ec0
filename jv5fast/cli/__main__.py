"""``python -m jv5fast.cli``: the ``jv5fast`` command (as ``python -m jv5fast``)."""
import sys

from .main import main

sys.exit(main())
