"""Sampler study on analytic data: every sampler against an exact denoiser (`make study`).

python study.py                          # every sampler x step count, DDPM schedule
python study.py -m diffusion=ddpm,sd,zsnr_v   # one study per schedule
"""

from ldm.study import main

if __name__ == "__main__":
    main()
