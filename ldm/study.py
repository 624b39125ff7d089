"""``python -m ldm.study``: the sampler study on analytic data (conf/study.yaml).

The repository's ``study.py`` runs this same entry point; the configs come from the package
(pkg://ldm.conf)."""

from ldm.app.study import main

if __name__ == "__main__":
    main()
