"""python -m ldm.data.prepare src=SRC out=OUT [key=value ...]

Turn a folder of images into WebDataset shards with fixed train / val / test splits:
every file under SRC is decoded (upright RGB); empty, non-image, corrupt, truncated and
too-small files, exact duplicates (same decoded pixels) and near duplicates (perceptual
hash within a few bits) are left out with a reason; captions and labels come from the
folder as ``ldm.data.folder.scan_folder`` reads it. A file's split is fixed by its pixels'
hash alone, so re-runs and added files never move an image between splits.
Writes OUT/{train,val,test}/{split}-000000.tar, ... and OUT/manifest.json.
Settings: conf/prepare.yaml, overridden as key=value (e.g. size=256 val_fraction=0.1);
the command line is ldm.app.prepare.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import get_args

import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from ldm import __version__
from ldm.data.builtin import SPLITS
from ldm.data.folder import METADATA_FILES, Record, scan_folder
from ldm.data.images import is_image_file, open_image
from ldm.data.phash import Duplicates, content_hash, phash
from ldm.data.transforms import ImageTransform, Interpolation
from ldm.data.wds import ShardWriter
from ldm.io import atomic_write
from ldm.seeding import stable_fraction

MANIFEST = "manifest.json"
STAGING_PREFIX = ".prepare-"  # OUT/.prepare-*: this run's shards until they are complete
CAPTION_EXTENSION = ".txt"  # scan_folder's sidecar captions
KEY_LENGTH = 16  # hex digits of the content hash in a sample's key (64 bits)
FILES_PER_WORKER = 32  # workers=0 starts no more processes than files / this
ORIGINAL_FORMATS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}  # keep
SETTINGS = {  # name: (check, what it must be); defaults: prepare() and conf/prepare.yaml
    "min_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "size": (lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"),
    "crop": (lambda v: v in ("center", None), "center or null"),
    "interpolation": (lambda v: v in get_args(Interpolation), ", ".join(get_args(Interpolation))),
    "format": (lambda v: v in ("png", "jpg", "keep"), "png, jpg or keep"),
    "quality": (lambda v: _is_int(v) and 1 <= v <= 100, "an integer from 1 to 100"),
    "val_fraction": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "test_fraction": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "near_duplicate_bits": (
        lambda v: v is None or (_is_int(v) and 0 <= v < 64),
        "null (off) or an integer from 0 to 63",
    ),
    "shard_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "strict": (lambda v: isinstance(v, bool), "true or false"),
    "workers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: one per CPU core)"),
    "progress": (lambda v: isinstance(v, bool), "true or false"),
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class _Result:
    """One file analysed: a skip reason, or its hashes and encoded output image."""

    skip: tuple[str, str] | None = None  # (kind, reason) when the file is left out
    digest: str = ""  # content hash of the decoded pixels
    phash: int = 0
    original_size: tuple[int, int] = (0, 0)  # (width, height), upright
    size: tuple[int, int] = (0, 0)  # (width, height) as stored
    data: bytes = b""
    ext: str = ""  # the image's extension in the shard


def resize(image: Image.Image, size: int, crop: str | None, interpolation: str) -> Image.Image:
    """Resize as ``ImageTransform`` does (cover the target, aspect kept, antialiased);
    ``crop="center"``: a centred size x size square, ``None``: the shorter side = size."""
    target = (size, size)
    if crop is None:
        scale = size / min(image.size)
        target = (max(size, round(image.height * scale)), max(size, round(image.width * scale)))
    tensor = ImageTransform(target, interpolation=interpolation)(image)  # (3, H, W) in [-1, 1]
    pixels = ((tensor + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(pixels.numpy())  # (H, W, 3)


def _analyse(path: Path, settings: dict) -> _Result:
    """Decode, check, hash and encode one file (in a worker process, if there are any)."""
    if not is_image_file(path):
        return _Result(("not an image", f"not an image ({path.suffix or 'no extension'})"))
    if path.stat().st_size == 0:
        return _Result(("empty file", "empty file"))
    try:
        image = open_image(path)
    except ValueError as err:
        message = str(err).replace(f"cannot decode image {path}: ", "")
        return _Result(("corrupt", f"corrupt: {message}"))
    width, height, min_size = *image.size, settings["min_size"]
    if min(width, height) < min_size:
        return _Result(("too small", f"too small: {width}x{height} < min_size {min_size}"))
    result = _Result(digest=content_hash(image), phash=phash(image), original_size=image.size)
    size, original = settings["size"], ORIGINAL_FORMATS.get(path.suffix.lower())
    if settings["format"] == "keep" and size is None and original:
        result.data, result.ext, result.size = path.read_bytes(), original, image.size
        return result
    if size is not None:
        image = resize(image, size, settings["crop"], settings["interpolation"])
    buffer = io.BytesIO()
    result.ext = "jpg" if settings["format"] == "jpg" else "png"  # keep: png if it must change
    image.save(buffer, format="JPEG" if result.ext == "jpg" else "PNG", quality=settings["quality"])
    result.data, result.size = buffer.getvalue(), image.size
    return result


def split_of(digest: str, val_fraction: float, test_fraction: float) -> str:
    """The split of an image from its content hash alone: val takes the bottom of [0, 1),
    test the top, so changing one fraction never moves images of the other."""
    u = stable_fraction(digest)
    return "val" if u < val_fraction else "test" if u >= 1 - test_fraction else "train"


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def _input_files(src: Path) -> list[Path]:
    """Every file under ``src`` except hidden ones, caption sidecars and metadata files."""
    files = sorted(
        p
        for p in src.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)
    )
    stems = {p.with_suffix("") for p in files if is_image_file(p)}
    return [
        p
        for p in files
        if not (p.suffix == CAPTION_EXTENSION and p.with_suffix("") in stems)
        and not (p.parent == src and p.name in METADATA_FILES)
    ]


def _previously_kept(out: Path) -> set[str]:
    """Files kept by the run that wrote OUT (they win duplicate ties), or {} for a new OUT."""
    if not out.exists():
        return set()
    if not out.is_dir():
        raise NotADirectoryError(f"OUT {out} is a file; give a folder for the shards")
    manifest = out / MANIFEST
    if not manifest.is_file():
        if any(not p.name.startswith(".") for p in out.iterdir()):  # ignore hidden files
            raise ValueError(
                f"OUT {out} is not empty and holds no {MANIFEST} from an earlier prepare run; "
                f"give a new or empty folder (prepare replaces {', '.join(SPLITS)}/ in it)"
            )
        return set()
    try:
        return {entry["path"] for entry in json.loads(manifest.read_text())["kept"]}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{manifest} is not a manifest written by prepare ({type(err).__name__}: {err}); "
            "remove it, or give another OUT"
        ) from None


def _check(src: Path, out: Path, settings: dict) -> None:
    for name, value in settings.items():
        check, what = SETTINGS[name]
        if not check(value):
            raise ValueError(f"setting {name}={value!r} is invalid: it must be {what}")
    if settings["val_fraction"] + settings["test_fraction"] >= 1:
        raise ValueError(
            f"val_fraction + test_fraction = {settings['val_fraction']} + "
            f"{settings['test_fraction']} leaves nothing for train; make their sum below 1"
        )
    if not src.exists():
        raise FileNotFoundError(f"SRC {src} does not exist; give the folder that holds the images")
    if not src.is_dir():
        raise NotADirectoryError(f"SRC {src} is a file; give the folder that holds the images")
    if out == src or src in out.parents:
        raise ValueError(f"OUT {out} is inside SRC {src}; give an OUT outside SRC")
    for split in SPLITS:
        if src == out / split or out / split in src.parents:
            raise ValueError(f"SRC {src} is inside {out / split}, which prepare replaces")


@contextmanager
def _mapper(workers: int, files: int) -> Iterator[Callable]:
    """``map`` over files, in order: here (workers=1) or in a pool of processes."""
    if workers == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = max(1, min(cores or 1, files // FILES_PER_WORKER))
    if workers == 1:
        yield map
        return
    # forkserver: safe beside threads (unlike fork), and the slow imports (torch) happen
    # once, in the server, instead of in every worker (spawn). Windows has only spawn.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(["ldm.data.folder", "ldm.data.transforms"])
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)
    )
    try:
        yield partial(pool.map, chunksize=4)
    finally:
        pool.shutdown(cancel_futures=True)


class _Sorter:
    """Decides, file by file in order, what is kept (the first of duplicates) and writes
    the kept samples into their split's shards."""

    def __init__(self, staging: Path, records: dict[Path, Record], settings: dict):
        self.records, self.settings = records, settings
        self.writers = {s: ShardWriter(staging / s, s, settings["shard_size"]) for s in SPLITS}
        self.kept: list[dict] = []
        self.skipped: list[dict] = []
        self.duplicates = Duplicates(settings["near_duplicate_bits"])

    def add(self, path: Path, name: str, result: _Result) -> None:
        skip = result.skip or self.duplicates.find(result.digest, result.phash)
        if skip:
            self.skipped.append({"path": name, "reason": skip[1], "kind": skip[0]})
            return
        self.duplicates.add(result.digest, result.phash, name)
        record = self.records[path]
        split = split_of(
            result.digest, self.settings["val_fraction"], self.settings["test_fraction"]
        )
        key = result.digest[:KEY_LENGTH]
        sizes = {"original_size": list(result.original_size), "size": list(result.size)}
        sample = {
            "__key__": key,
            result.ext: result.data,
            "txt": (record.caption or "").encode(),
            "json": json.dumps({"source": name, **sizes, "content_hash": result.digest}).encode(),
        }
        if record.label >= 0:
            sample["cls"] = str(record.label).encode()
        shard = f"{split}/{self.writers[split].write(sample).name}"  # relative to OUT
        self.kept.append(
            {"path": name, "split": split, "key": key, "shard": shard,
             "caption": record.caption or "", "label": record.label, **sizes}
        )  # fmt: skip

    def close(self) -> dict:
        """The manifest's counts, shards and file lists."""
        for writer in self.writers.values():
            writer.close()
        kept, skipped = self.kept, self.skipped
        return {
            "counts": {split: sum(k["split"] == split for k in kept) for split in SPLITS},
            "totals": {
                "total_files": len(kept) + len(skipped),
                "kept": len(kept),
                "skipped": len(skipped),
            },
            "skipped_by_reason": dict(Counter(s["kind"] for s in skipped).most_common()),
            "shards": {
                split: [f"{split}/{path.name}" for path in writer.paths]
                for split, writer in self.writers.items()
            },
            "kept": sorted(kept, key=lambda k: k["path"]),
            "skipped": sorted(skipped, key=lambda s: s["path"]),
        }


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr (only on a terminal); yields its advance function."""
    console = Console(stderr=True)
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not (enabled and console.is_terminal)) as bar:
        task = bar.add_task("preparing", total=total)
        yield lambda: bar.advance(task)


def prepare(
    src: str | Path,
    out: str | Path,
    *,
    min_size: int = 64,
    size: int | None = None,
    crop: str | None = "center",
    interpolation: str = "bicubic",
    format: str = "png",
    quality: int = 95,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    near_duplicate_bits: int | None = 6,
    shard_size: int = 1000,
    strict: bool = False,
    workers: int = 0,
    progress: bool = True,
) -> dict:
    """Shard the images under ``src`` into ``out``; returns the manifest (see
    docs/prepare.md; the settings are described in conf/prepare.yaml)."""
    settings = {name: value for name, value in locals().items() if name in SETTINGS}
    src, out = Path(src).resolve(), Path(out).resolve()
    _check(src, out, settings)
    files = _input_files(src)
    if not files:
        raise ValueError(
            f"SRC {src} holds no files (hidden ones are ignored); is it the right path?"
        )
    records, classes = {}, []
    if any(is_image_file(p) for p in files):
        found, classes = scan_folder(src, strict=strict, caption_extension=CAPTION_EXTENSION)
        records = {r.path: r for r in found}
    previous = _previously_kept(out)
    names = {p: p.relative_to(src).as_posix() for p in files}
    files.sort(key=lambda p: (names[p] not in previous, names[p]))  # earlier winners first

    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(f"{STAGING_PREFIX}*"):  # from a run that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=STAGING_PREFIX))
    try:
        sorter = _Sorter(staging, records, settings)
        with _mapper(workers, len(files)) as map_, _progress(progress, len(files)) as advance:
            results = map_(partial(_analyse, settings=settings), files)
            for path, result in zip(files, results, strict=True):
                sorter.add(path, names[path], result)
                advance()
        manifest = {
            "tool": "ldm.data.prepare",
            "version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": str(src),
            "settings": settings,
            **sorter.close(),
            "classes": classes,
        }
        _publish(staging, out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _publish(staging: Path, out: Path, manifest: dict) -> None:
    """Swap this run's splits into ``out`` (the previous ones go to ``staging/old``, removed
    with it), then write the manifest."""
    old = staging / "old"
    old.mkdir()
    for split in SPLITS:
        if (out / split).exists():
            os.replace(out / split, old / split)
        if (staging / split).exists():
            os.replace(staging / split, out / split)
    _write_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def summary(manifest: dict) -> str:
    """One paragraph: what was kept per split, what was skipped and why."""
    totals, counts, shards = manifest["totals"], manifest["counts"], manifest["shards"]
    splits = ", ".join(
        f"{split} {counts[split]} ({len(shards[split])} shard{'s' * (len(shards[split]) != 1)})"
        for split in SPLITS
    )
    text = f"Kept {totals['kept']} of {totals['total_files']} files from {manifest['source']}: "
    text += splits + "."
    uncaptioned = sum(not k["caption"] for k in manifest["kept"])
    if uncaptioned:
        text += f" {uncaptioned} kept image(s) have no caption (stored as '')."
    reasons = ", ".join(f"{n} {kind}" for kind, n in manifest["skipped_by_reason"].items())
    text += f" Skipped {totals['skipped']}" + (f": {reasons}." if reasons else ".")
    return text + " Every file and its fate is listed in manifest.json."


if __name__ == "__main__":  # the command line lives with the other tools' (ldm.app)
    from ldm.app.prepare import main

    main()
