"""``python -m ldm.convert``: the command line lives in ``ldm.app.convert``."""

import sys

from ldm.app.convert import main

if __name__ == "__main__":
    sys.exit(main())
