"""Weight formats: safe reading, Stable Diffusion and diffusers layouts."""
