"""ImageTransform (resize, crop, flip, range), image modes, and aspect-ratio buckets."""

import math

import numpy as np
import pytest
import torch
from datautils import random_rgb
from PIL import Image

from ldm.data.folder import FolderDataset, image_size
from ldm.data.images import open_image, to_rgb
from ldm.data.samplers import BucketBatchSampler
from ldm.data.transforms import ImageTransform, make_buckets, nearest_bucket


def test_resize_covers_then_crops_the_center():
    # A 40 x 80 image, black but for a white band over the middle 60 columns.
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, 10:70] = 255
    out = ImageTransform(20)(Image.fromarray(pixels))
    assert out.shape == (3, 20, 20) and out.dtype == torch.float32
    assert out.min() == 1.0  # the center crop keeps only the white middle, at +1
    black = ImageTransform((10, 40))(Image.fromarray(pixels))  # no crop needed: full width
    assert black.shape == (3, 10, 40) and black.min() == -1.0


def test_random_crop_and_flip_follow_the_torch_seed():
    image = random_rgb(48, 64)
    transform = ImageTransform(32, crop="random", flip=True)
    torch.manual_seed(0)
    a = [transform(image) for _ in range(8)]
    torch.manual_seed(0)
    b = [transform(image) for _ in range(8)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert len({x.sum().item() for x in a}) > 1  # the crops and flips do vary
    with pytest.raises(ValueError, match="crop must be"):
        ImageTransform(8, crop="top")


def test_every_image_mode_becomes_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # onto white, not black
    palette = Image.new("P", (4, 4), 3)
    assert to_rgb(palette).mode == "RGB"
    grey16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert to_rgb(grey16).getpixel((0, 0)) == (255, 255, 255)
    # EXIF orientation 6 (rotate 90): a 30 x 20 JPEG decodes as 20 x 30.
    image = random_rgb(20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (20, 30)
    assert image_size(tmp_path / "rotated.jpg") == (30, 20)  # (height, width), from the header
    (tmp_path / "half.png").write_bytes((tmp_path / "rotated.jpg").read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cannot decode image .*half.png"):
        open_image(tmp_path / "half.png")


def test_buckets_have_the_area_the_multiple_and_the_ratio():
    buckets = make_buckets(256 * 256, 32, 2.0)
    assert (256, 256) in buckets and (192, 320) in buckets and (320, 192) in buckets
    for h, w in buckets:
        assert h % 32 == 0 and w % 32 == 0 and h * w <= 256 * 256
        assert max(h, w) / min(h, w) <= 2.0
    assert nearest_bucket(300, 600, buckets) == min(buckets, key=lambda b: abs(b[1] / b[0] - 2))
    assert nearest_bucket(1000, 1000, buckets) == (256, 256)


def test_bucket_batches_share_a_shape_and_split_evenly_over_ranks():
    buckets = [(64, 64)] * 10 + [(32, 128)] * 7 + [(128, 32)] * 3
    batches = list(BucketBatchSampler(buckets, 4, seed=1))
    assert sorted(i for b in batches for i in b) == list(range(20))  # each index once
    assert all(len({buckets[i] for i in b}) == 1 for b in batches)
    per_rank = [list(BucketBatchSampler(buckets, 4, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == math.floor(len(batches) / 2)
    assert not {i for b in per_rank[0] for i in b} & {i for b in per_rank[1] for i in b}
    sampler = BucketBatchSampler(buckets, 4, seed=1)
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_folder_buckets_give_images_of_their_bucket(tmp_path):
    for i, (h, w) in enumerate([(64, 64), (40, 90), (90, 40), (50, 100)]):
        random_rgb(h, w, seed=i).save(tmp_path / f"{i}.png")
    data = FolderDataset(tmp_path, bucket_area=32 * 32, bucket_multiple=8, bucket_max_ratio=2.5)
    for index, bucket in enumerate(data.buckets):
        assert data[index]["image"].shape[1:] == bucket
    assert data.buckets[0] == (32, 32) and data.buckets[1][1] > data.buckets[1][0]


def test_sharded_sampler_covers_the_epoch_once_and_resumes():
    from ldm.data.samplers import ShardedSampler

    shares = [list(ShardedSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]  # the tail of 1 is dropped for training
    assert len({i for s in shares for i in s}) == 9
    held_out = [
        list(ShardedSampler(10, shuffle=False, rank=r, world_size=3, drop_tail=False))
        for r in range(3)
    ]
    assert sorted(i for s in held_out for i in s) == list(range(10))
    sampler = ShardedSampler(10, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip(2, 4)
    assert list(sampler) == full[4:] and len(sampler) == 10
    sampler.set_epoch(3)
    assert len(list(sampler)) == 10  # the skip belongs to epoch 2 only
