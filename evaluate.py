"""Score a checkpoint against a held-out split over a sampler grid (see conf/evaluate.yaml).

python evaluate.py checkpoint=outputs/shapes_ldm/checkpoints/last.ckpt num_samples=1000
python evaluate.py checkpoint=... grid.sampler=[ddim,ddpm] grid.steps=[10,20,50,100,1000] \
    grid.eta=[0,0.5,1] repeats=3
python evaluate.py checkpoint=... fabric.devices=2 fabric.strategy=ddp   # same numbers
"""

from ldm.evaluate import main

if __name__ == "__main__":
    main()
