"""``python -m ldm.evaluate``: score a checkpoint over a sampler grid (conf/evaluate.yaml).

The repository's ``evaluate.py`` runs this same entry point; the configs come from the package
(pkg://ldm.conf), so an installed ldm runs from any folder."""

from ldm.app.evaluate import main

if __name__ == "__main__":
    main()
