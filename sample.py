"""Sample a trained model (see conf/sample.yaml).

python sample.py checkpoint=outputs/shapes_ldm/checkpoints/last.ckpt prompts='["a red circle"]'
python sample.py checkpoint=... prompts_file=prompts.txt sampler=dpmpp_2m sampler.steps=25
python sample.py -m checkpoint=... guidance_scale=1,3,7 sampler=ddim,ddpm   # one folder each
"""

from ldm.sample import main

if __name__ == "__main__":
    main()
