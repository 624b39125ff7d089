"""The configs, shipped inside the package (ldm/conf links here) so that an installed ldm
finds them: Hydra's pkg://ldm.conf."""
