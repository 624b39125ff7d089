"""FID floors for a study: what real images, and their VAE reconstructions, score against
the same cached reference statistics at the same n as the generated samples.

A generated set cannot beat the first floor (other real images of the dataset), and a
latent model cannot beat the second (its VAE's round trip) by much. Both give the scale on
which a study's FIDs are to be read.

    .venv/bin/python benchmarks/fid_floors.py REFERENCE.safetensors --vae VAE.ckpt [--n 500]
    .venv/bin/python benchmarks/fid_floors.py CACHE_DIR --data shapes --vae VAE.ckpt --n 1000

Given a folder instead of a file, the reference is that of ``--data``'s ``val`` split (``--n``
images), made there as evaluate.py and the FID callback make it, or reused from there.

Several ``--vae`` checkpoints (say every 1000 steps of one run) give the reconstruction
floor's curve against training: the real-image floor is computed once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ldm.metrics.extractors import make_extractor, to_uint8
    from ldm.metrics.reference import read_reference, reference_features, source_config
    from ldm.metrics.scores import GenerativeMetrics
    from ldm.training.checkpoints import load_vae

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "reference", help="a reference-*.safetensors of evaluate.py, or a folder of them"
    )
    parser.add_argument("--data", default="shapes", help="conf/data: the reference, for a folder")
    parser.add_argument(
        "--vae", required=True, nargs="+", help="the VAE checkpoint(s) of the study's model"
    )
    parser.add_argument("--n", type=int, default=500, help="images per set (the study's n)")
    parser.add_argument("--split", default="train", help="where the real images come from")
    parser.add_argument("--extractor", default="torchscript:fid-helper")
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()

    extractor = make_extractor(args.extractor)
    if Path(args.reference).is_dir():
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            data = instantiate(compose("train", overrides=[f"data={args.data}"]).data)
        reference, provenance, _ = reference_features(
            data.dataset("val"), extractor, dataset_config=source_config(data.factory),
            split="val", count=args.n, cache_dir=args.reference,
        )  # fmt: skip
    else:
        reference, provenance = read_reference(args.reference)
    # the reference's dataset, as a factory or not: built for --split
    source = {k: v for k, v in provenance["dataset"].items() if k != "_partial_"}
    dataset = instantiate(source, split=args.split)
    if args.split == provenance["split"]:
        sys.exit(f"--split {args.split} is the reference's own split: pick another one")
    for name, path in [("real images", None)] + [("VAE reconstructions", v) for v in args.vae]:
        vae = load_vae(path).eval() if path else None
        metrics = GenerativeMetrics(reference, kid_subset_size=args.n)
        for start in range(0, args.n, args.batch_size):
            indices = range(start, min(start + args.batch_size, args.n))
            images = torch.stack([dataset[i]["image"] for i in indices])
            with torch.no_grad():
                if vae is not None:
                    images = vae.decode(vae.encode(images).mean).clamp(-1, 1)
                features = extractor.features(to_uint8(images))
            metrics.update(features, torch.tensor(list(indices)))
        result = metrics.compute()
        of = f" of {path}" if path else ""
        print(
            f"{name}{of} ({args.split}, n={args.n}) vs {provenance['split']} reference "
            f"(n={len(reference)}): FID {result['fid']:.2f}, KID {result['kid_mean']:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
