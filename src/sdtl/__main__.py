"""``python -m sdtl`` is the same as the ``sdtl`` command."""
import sys

from sdtl.cli import main

sys.exit(main())
