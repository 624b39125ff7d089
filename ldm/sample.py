"""``python -m ldm.sample``: sample a trained model (conf/sample.yaml).

The repository's ``sample.py`` runs this same entry point; the configs come from the package
(pkg://ldm.conf), so an installed ldm runs from any folder."""

from ldm.app.sample import main

if __name__ == "__main__":
    main()
