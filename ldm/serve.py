"""``python -m ldm.serve``: the HTTP generation service (conf/serve.yaml; docs/serving.md)."""

from ldm.app.serve import main

if __name__ == "__main__":
    main()
