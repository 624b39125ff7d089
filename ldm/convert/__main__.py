"""``python -m ldm.convert``: the command line lives in ``ldm.app.convert``."""

from ldm.app.convert import main

if __name__ == "__main__":
    main()
