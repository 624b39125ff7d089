"""ldm: a from-scratch latent diffusion research framework."""

from pathlib import Path

__version__ = "0.1.0"

# The configs: conf/ of the repository, shipped inside the package (ldm/conf links to it),
# so an installed ldm finds them too (Hydra: pkg://ldm.conf).
CONF_DIR = Path(__file__).parent / "conf"
