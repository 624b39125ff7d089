"""python -m ldm.data.prepare: every input file accounted for, duplicates and bad files
left out with their reason, splits fixed by content, shards readable, clear errors."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos
from testutils import tool_config

from ldm import CONF_DIR
from ldm.app.prepare import main
from ldm.data import prepare as prepare_module
from ldm.data.images import open_image
from ldm.data.phash import Duplicates, content_hash, phash
from ldm.data.prepare import SETTINGS, prepare, split_of
from ldm.data.wds import WebDatasetSource

FAST = {"workers": 1, "progress": False}  # no process pool for a dozen files


def photo(name: str, width: int, height: int) -> Image.Image:
    """A real photo from scikit-image (bundled, offline), resized to width x height."""
    pixels = getattr(photos, name)()
    image = Image.fromarray(pixels)
    return image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


# path -> the reason it is skipped (None: kept)
EXPECTED = {
    "astronaut.png": None,
    "chelsea.png": None,
    "coffee.jpg": None,
    "grey.png": None,
    "moon16.png": None,
    "palette.png": None,
    "rgba.png": None,
    "rocket_exif.jpg": None,
    "chelsea_half.png": "near duplicate of chelsea.png (hamming ",
    "copies/astronaut copy.png": "exact duplicate of astronaut.png",
    "coffee_pixels.png": "exact duplicate of coffee.jpg",
    "empty.jpg": "empty file",
    "fake.png": "corrupt: ",
    "notes.pdf": "not an image (.pdf)",
    "readme.md": "not an image (.md)",
    "tiny.png": "too small: 48x40 < min_size 64",
    "truncated.jpg": "corrupt: OSError: image file is truncated",
}


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    """Good photos in every mode, a rotated JPEG, and each kind of file to leave out."""
    root = tmp_path_factory.mktemp("messy")
    (root / "copies").mkdir()
    photo("astronaut", 96, 96).save(root / "astronaut.png")
    (root / "astronaut.txt").write_text("an astronaut\n")  # a caption sidecar: not an input
    shutil.copy(root / "astronaut.png", root / "copies" / "astronaut copy.png")
    chelsea = photo("chelsea", 160, 128)
    chelsea.save(root / "chelsea.png")
    chelsea.resize((80, 64), Image.Resampling.LANCZOS).save(root / "chelsea_half.png")
    (root / "coffee.jpg").write_bytes(jpeg_bytes(photo("coffee", 120, 80)))
    (root / "coffee.txt").write_text("a cup of coffee")
    open_image(root / "coffee.jpg").save(root / "coffee_pixels.png")  # same pixels, other file
    photo("camera", 90, 90).convert("L").save(root / "grey.png")
    moon = np.asarray(photo("moon", 80, 80).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(moon).save(root / "moon16.png")  # 16-bit greyscale
    photo("hubble_deep_field", 100, 90).quantize(64).save(root / "palette.png")
    rgba = photo("immunohistochemistry", 90, 100).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((90, 100)))
    rgba.save(root / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: turn 90 degrees clockwise to view
    rocket = photo("rocket", 120, 80).transpose(Image.Transpose.ROTATE_90)
    (root / "rocket_exif.jpg").write_bytes(jpeg_bytes(rocket, exif=exif.tobytes()))
    (root / "truncated.jpg").write_bytes(jpeg_bytes(photo("coins", 120, 100))[:1500])
    (root / "empty.jpg").write_bytes(b"")
    (root / "fake.png").write_bytes(np.random.default_rng(0).bytes(500))
    (root / "notes.pdf").write_bytes(np.random.default_rng(1).bytes(300))
    (root / "readme.md").write_text("# not a caption: no image is called readme\n")
    photo("clock", 48, 40).save(root / "tiny.png")
    (root / ".DS_Store").write_bytes(b"\0\1")  # hidden: not an input at all
    return root


@pytest.fixture(scope="module")
def prepared(messy, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared") / "out"
    return out, prepare(messy, out, val_fraction=0.25, test_fraction=0.25, **FAST)


def read_shards(out: Path, manifest: dict, size: int = 32) -> dict[str, dict]:
    shards = [str(out / s) for split in manifest["shards"].values() for s in split]
    source = WebDatasetSource(shards, shuffle=False, size=size)
    return {sample["key"]: sample for sample in source}


def stored(out: Path, entry: dict) -> tuple[str, bytes]:
    """(extension, bytes) of one kept file's image as stored in its shard."""
    with tarfile.open(out / entry["shard"]) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            if key == entry["key"] and ext in ("png", "jpg", "webp"):
                return ext, tar.extractfile(member).read()
    raise AssertionError(f"no image for {entry['key']} in {entry['shard']}")


def stored_image(out: Path, entry: dict) -> Image.Image:
    return Image.open(io.BytesIO(stored(out, entry)[1]))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def test_every_file_is_kept_or_skipped_with_its_reason(prepared):
    out, manifest = prepared
    totals = manifest["totals"]
    expected_kept = {path for path, reason in EXPECTED.items() if reason is None}
    skipped = len(EXPECTED) - len(expected_kept)
    assert totals == {"total_files": len(EXPECTED), "kept": len(expected_kept), "skipped": skipped}
    assert {entry["path"] for entry in manifest["kept"]} == expected_kept
    for entry in manifest["skipped"]:
        assert entry["reason"].startswith(EXPECTED[entry["path"]]), entry
    assert sum(manifest["counts"].values()) == totals["kept"]
    assert sum(manifest["skipped_by_reason"].values()) == totals["skipped"]
    assert manifest["skipped_by_reason"]["corrupt"] == 2
    captions = {entry["path"]: entry["caption"] for entry in manifest["kept"]}
    assert captions["astronaut.png"] == "an astronaut" and captions["chelsea.png"] == ""
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["kept"] == manifest["kept"] and on_disk["skipped"] == manifest["skipped"]


def test_output_is_complete_and_upright(prepared, messy):
    out, manifest = prepared
    tars = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tar"))
    assert tars == sorted(s for split in manifest["shards"].values() for s in split)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", *(s for s in manifest["counts"] if manifest["counts"][s])]
    )  # no temporary files or folders left
    entries = {entry["path"]: entry for entry in manifest["kept"]}
    rocket = stored_image(out, entries["rocket_exif.jpg"])
    assert rocket.size == (120, 80) == tuple(entries["rocket_exif.jpg"]["original_size"])
    assert np.array_equal(np.asarray(rocket), np.asarray(open_image(messy / "rocket_exif.jpg")))
    error = np.abs(np.asarray(rocket, float) - np.asarray(photo("rocket", 120, 80), float))
    assert error.mean() < 8  # the photo as taken, not turned (JPEG error only)
    rgba = np.asarray(stored_image(out, entries["rgba.png"]))
    assert rgba.shape == (100, 90, 3) and rgba[0].min() > 240  # transparent top: white


def test_shards_read_back_as_the_kept_samples(prepared):
    out, manifest = prepared
    samples = read_shards(out, manifest)
    assert sorted(samples) == sorted(entry["key"] for entry in manifest["kept"])
    for entry in manifest["kept"]:
        sample = samples[entry["key"]]
        assert sample["caption"] == entry["caption"] and sample["label"] == -1
        assert sample["image"].shape == (3, 32, 32)
        assert sample["image"].min() >= -1 and sample["image"].max() <= 1
    for split, count in manifest["counts"].items():
        assert count == sum(entry["split"] == split for entry in manifest["kept"])


def test_class_folders_give_labels(tmp_path):
    src = tmp_path / "src"
    for name, label in (("astronaut", "people"), ("coffee", "things"), ("rocket", "things")):
        (src / label).mkdir(parents=True, exist_ok=True)
        photo(name, 80, 80).save(src / label / f"{name}.png")
    manifest = prepare(src, tmp_path / "out", **FAST)
    assert manifest["classes"] == ["people", "things"]
    samples = read_shards(tmp_path / "out", manifest)
    labels = {entry["path"]: samples[entry["key"]]["label"] for entry in manifest["kept"]}
    assert labels == {"people/astronaut.png": 0, "things/coffee.png": 1, "things/rocket.png": 1}
    assert {samples[e["key"]]["caption"] for e in manifest["kept"]} == {"people", "things"}


def test_splits_and_shards_are_reproducible(messy, prepared, tmp_path):
    first_out, first = prepared
    second = prepare(messy, tmp_path / "again", val_fraction=0.25, test_fraction=0.25, **FAST)
    assert second["kept"] == first["kept"] and second["skipped"] == first["skipped"]
    for split in second["shards"].values():
        for shard in split:
            assert (tmp_path / "again" / shard).read_bytes() == (first_out / shard).read_bytes()
    assert {e["split"] for e in first["kept"]} == {"train", "val", "test"}  # all three used


def test_adding_files_keeps_what_was_kept(messy, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(messy, src)
    before = prepare(src, out, shard_size=2, **FAST)
    assert len(before["shards"]["train"]) > 1
    # New files that sort first and duplicate kept ones must not evict them.
    shutil.copy(src / "chelsea.png", src / "aaa chelsea.png")
    photo("chelsea", 120, 96).save(src / "aab chelsea smaller.png")
    photo("coins", 100, 100).save(src / "coins.png")
    after = prepare(src, out, **FAST)
    old = {(e["path"], e["split"], e["key"]) for e in before["kept"]}
    assert old <= {(e["path"], e["split"], e["key"]) for e in after["kept"]}
    assert {e["path"] for e in after["kept"]} - {e["path"] for e in before["kept"]} == {"coins.png"}
    reasons = {s["path"]: s["reason"] for s in after["skipped"]}
    assert reasons["aaa chelsea.png"] == "exact duplicate of chelsea.png"
    assert reasons["aab chelsea smaller.png"].startswith("near duplicate of chelsea.png")
    assert after["totals"]["total_files"] == before["totals"]["total_files"] + 3
    # shard_size went from 2 to 1000: the earlier run's extra shards are gone
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tar")) == sorted(
        s for split in after["shards"].values() for s in split
    )
    assert all(len(split) <= 1 for split in after["shards"].values())


@pytest.mark.parametrize(
    ("settings", "ext", "stored_size"),
    [
        ({"size": 48}, "png", (48, 48)),
        ({"size": 48, "crop": None, "format": "jpg"}, "jpg", (72, 48)),
        ({"format": "keep"}, "jpg", (80, 120)),  # the original bytes, EXIF rotation and all
    ],
)
def test_resize_and_formats(messy, tmp_path, settings, ext, stored_size):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(messy / "rocket_exif.jpg", src)
    manifest = prepare(src, tmp_path / "out", **settings, **FAST)
    stored_ext, data = stored(tmp_path / "out", manifest["kept"][0])
    assert stored_ext == ext and Image.open(io.BytesIO(data)).size == stored_size
    upright = open_image(data).size
    assert upright == ((120, 80) if settings.get("size") is None else stored_size)
    if settings.get("format") == "keep":
        assert data == (messy / "rocket_exif.jpg").read_bytes()


def test_split_depends_on_content_alone():
    digests = [f"{i:064x}" for i in range(0, 2**20, 997)]
    base = {d: split_of(d, 0.05, 0.05) for d in digests}
    more_val = {d: split_of(d, 0.2, 0.05) for d in digests}
    assert {d for d in digests if base[d] == "test"} == {
        d for d in digests if more_val[d] == "test"
    }
    assert all(more_val[d] == "val" for d in digests if base[d] == "val")
    assert 0.02 < sum(s == "val" for s in base.values()) / len(digests) < 0.08


def test_parallel_workers_give_the_same_result(messy, prepared, tmp_path):
    _, serial = prepared
    parallel = prepare(
        messy, tmp_path / "out", val_fraction=0.25, test_fraction=0.25, workers=2, progress=False
    )
    assert parallel["kept"] == serial["kept"] and parallel["skipped"] == serial["skipped"]


def test_perceptual_hash_tells_resized_copies_from_other_photos():
    names = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field")
    images = {name: photo(name, 256, 192) for name in names}
    hashes = {name: phash(image) for name, image in images.items()}
    for name, image in images.items():
        half = image.resize((128, 96), Image.Resampling.BILINEAR)
        assert hamming(phash(half), hashes[name]) <= 6
        recompressed = Image.open(io.BytesIO(jpeg_bytes(image)))
        assert hamming(phash(recompressed), hashes[name]) <= 6
    for a in names:
        for b in names:
            if a < b:
                assert hamming(hashes[a], hashes[b]) > 12, (a, b)
    assert content_hash(images["coffee"]) != content_hash(images["coffee"].rotate(180))


@pytest.mark.parametrize("numpy_popcount", [True, False])
def test_duplicates_by_content_and_by_hash_distance(monkeypatch, numpy_popcount):
    if not numpy_popcount:  # the byte-table fallback for numpy < 2
        monkeypatch.delattr(np, "bitwise_count", raising=False)
    found = Duplicates(max_bits=3)
    assert found.find("a", 0) is None
    found.add("a", 0, "first.png")
    found.add("b", 0xFF << 56, "second.png")
    assert found.find("a", 2**64 - 1) == ("exact duplicate", "exact duplicate of first.png")
    assert found.find("c", 0b111) == ("near duplicate", "near duplicate of first.png (hamming 3)")
    assert found.find("c", 0b1111) is None
    assert found.find("c", (0xFF << 56) | 1)[1] == "near duplicate of second.png (hamming 1)"
    exact_only = Duplicates(max_bits=None)
    exact_only.add("a", 0, "first.png")
    assert exact_only.find("c", 1) is None and exact_only.find("a", 1)[0] == "exact duplicate"


def test_dct_matches_scipy():
    scipy_fft = pytest.importorskip("scipy.fft")
    from ldm.data.phash import _dct_matrix

    x = np.random.default_rng(0).random((32, 32))
    basis = _dct_matrix(32)
    expected = scipy_fft.dct(scipy_fft.dct(x, axis=0), axis=1)
    np.testing.assert_allclose(4 * basis @ x @ basis.T, expected, atol=1e-9)


def test_config_defaults_match_the_function():
    import inspect

    from omegaconf import OmegaConf

    conf = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "prepare.yaml"))
    del conf["defaults"], conf["src"], conf["out"], conf["hydra"]
    defaults = {
        name: p.default
        for name, p in inspect.signature(prepare).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    }
    assert conf == defaults and set(conf) == set(SETTINGS)


def test_main_with_overrides(messy, tmp_path, capsys):
    out = tmp_path / "out"
    main(tool_config("prepare", f"src={messy}", f"out={out}", "size=32", "val_fraction=0.1"))
    printed = capsys.readouterr().out
    assert "Kept 8 of 17 files" in printed and "2 corrupt" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["size"] == 32 and manifest["settings"]["val_fraction"] == 0.1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["src={missing}", "out={out}"], "does not exist"),
        (["val_fraction=1.5"], "val_fraction=1.5 is invalid"),
        (["val_fraction=0.6", "test_fraction=0.5"], "leaves nothing for train"),
        (["+sise=32"], "unknown setting sise; the settings are min_size"),
        (["size=big"], "size='big' is invalid"),
        (["out={src}/out"], "is inside SRC"),
        (["src={empty}"], "holds no files"),
        (["strict=true"], "have no caption (strict mode)"),
        (["src=???"], "src is required"),
    ],
)
def test_bad_input_is_one_clear_message(messy, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    paths = {"src": messy, "out": tmp_path / "out", "missing": tmp_path / "nope"}
    paths["empty"] = tmp_path / "empty"
    argv = ["src={src}", "out={out}", "workers=1", *args]
    with pytest.raises(SystemExit) as exit:
        main(tool_config("prepare", *[arg.format(**paths) for arg in argv]))
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (messy / "out").exists()


def test_out_that_is_not_from_prepare_is_refused(messy, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match=r"holds no manifest\.json"):
        prepare(messy, tmp_path / "out", **FAST)


def test_a_failed_run_leaves_out_as_it_was(messy, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(messy, out, **FAST)
    (out / ".prepare-killed").mkdir()  # what a killed run leaves behind
    (out / ".prepare-killed" / "train-000000.tar").write_bytes(b"half")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    analyse = prepare_module._analyse

    def fail_on_rgba(path, settings):
        if path.name == "rgba.png":
            raise RuntimeError("disk full")
        return analyse(path, settings)

    monkeypatch.setattr(prepare_module, "_analyse", fail_on_rgba)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(messy, out, shard_size=1, **FAST)  # shards were complete before the failure
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == {p: data for p, data in before.items() if ".prepare-" not in str(p)}
