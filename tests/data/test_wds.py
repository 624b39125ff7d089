"""WebDataset shards: URL forms, splitting over ranks and workers, resampled mode, errors."""

import io
import tarfile

import pytest
from datautils import write_shards
from torch.utils.data import DataLoader

from ldm.data.wds import WebDatasetSource, expand_shards, split_urls, webdataset


def keys_of(dataset, workers, batch_size=4):
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    batches = list(loader)
    return [k for b in batches for k in b["key"]], len(batches)


def test_url_forms(tmp_path, shards):
    paths = sorted(str(p) for p in (shards / "train").glob("*.tar"))
    pattern = str(shards / "train" / "train-{000000..000004}.tar")
    assert expand_shards(pattern) == paths
    assert expand_shards(f"{paths[0]}::{paths[1]}") == paths[:2]
    assert split_urls(shards, "val") == [str(shards / "val" / "val-000000.tar")]
    with pytest.raises(
        ValueError, match=r"no test/\*.tar under .* with shards: \['train', 'val'\]"
    ):
        split_urls(shards, "test")
    with pytest.raises(ValueError, match="no val shards: urls names one set of shards"):
        split_urls(pattern, "val")
    # pipe: runs a command and reads the tar from its stdout.
    piped = WebDatasetSource(f"pipe:cat {paths[0]}", shuffle=False, size=16)
    assert [s["key"] for s in piped] == [f"sample{i:05d}" for i in range(8)]


@pytest.mark.parametrize("workers", [0, 2])
def test_plain_mode_serves_every_sample_once_over_ranks_and_workers(shards, workers):
    everything = {f"sample{i:05d}" for i in range(40)}
    seen = []
    for rank in range(2):
        source = webdataset("train", urls=shards, size=16, shuffle_buffer=10, seed=1)
        source.rank, source.world_size = rank, 2  # two simulated DDP ranks
        keys, _ = keys_of(source, workers)
        seen += keys
    assert len(seen) == len(set(seen)) == 40 and set(seen) == everything


def test_each_epoch_reshuffles_the_same_samples(shards):
    source = webdataset("train", urls=shards, size=16, shuffle_buffer=10, seed=1)
    first = [s["key"] for s in source]
    source.set_epoch(1)
    second = [s["key"] for s in source]
    assert sorted(first) == sorted(second) and first != second
    source.set_epoch(0)
    assert [s["key"] for s in source] == first  # deterministic per (seed, epoch)
    held_out = webdataset("val", urls=shards, size=16)
    assert [s["key"] for s in held_out] == [f"sample{i:05d}" for i in range(6)]


def test_resampled_mode_gives_every_rank_the_same_batch_count(tmp_path):
    # Three shards of unequal size cannot be dealt evenly to 2 ranks x 2 workers.
    folder = tmp_path / "uneven"
    write_shards(folder, 12, 12, "a")
    write_shards(folder, 3, 3, "b")
    write_shards(folder, 5, 5, "c")
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    counts, plain = [], []
    for rank in range(2):
        resampled = WebDatasetSource(
            urls, size=16, resampled=True, samples_per_epoch=18, rank=rank, world_size=2
        )
        keys, batches = keys_of(resampled, workers=2)
        counts.append((len(keys), batches))
        plain_source = WebDatasetSource(urls, size=16, shuffle=False, rank=rank, world_size=2)
        plain.append(len(keys_of(plain_source, workers=2)[0]))
    assert counts[0] == counts[1] == (18, 6)  # 9 per worker: batches of 4, 4, 1 each
    assert plain == [12 + 3, 5]  # plain mode: shards a, b to rank 0's workers, c to rank 1's


def test_bad_samples_raise_or_are_skipped(tmp_path, caplog):
    path = tmp_path / "bad.tar"
    good = write_shards(tmp_path / "good", 2, 2)[0]
    with tarfile.open(good) as src, tarfile.open(path, "w") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        for name, data in (("broken.png", b"not a png"), ("broken.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"sample 'broken' of .*bad.tar: cannot decode image"):
        list(WebDatasetSource(str(path), shuffle=False, size=16))
    kept = list(WebDatasetSource(str(path), shuffle=False, size=16, on_error="warn"))
    assert [s["key"] for s in kept] == ["sample00000", "sample00001"]
    assert "skipped a sample" in caplog.text
    with pytest.raises(ValueError, match="needs samples_per_epoch"):
        WebDatasetSource(str(path), resampled=True)
