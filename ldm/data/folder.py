"""Captioned image folders.

Three layouts, found in this order:

1. ``metadata.jsonl`` or ``metadata.csv`` at the root (Hugging Face ``imagefolder``
   style): a ``file_name`` per row, the caption in ``text`` (or ``caption``), an optional
   ``label`` (an integer or a class name);
2. a caption beside each image: ``cat.png`` + ``cat.txt``;
3. class sub-folders: ``root/<class>/*.png``; the label is the class's index in sorted
   order, and the caption the class name unless a ``.txt`` gives one.

A folder with ``train/``, ``val/`` or ``test/`` sub-folders serves those as splits;
otherwise the whole folder is the train split (make held-out splits with
``python -m ldm.data.prepare``).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from ldm.data.builtin import SPLITS, Sample, check_split
from ldm.data.images import IMAGE_EXTENSIONS, is_image_file, open_image
from ldm.data.transforms import Crop, ImageTransform, make_buckets, nearest_bucket

log = logging.getLogger(__name__)
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_KEYS = ("text", "caption")
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class Record:
    path: Path
    caption: str | None  # None: no caption found
    label: int  # -1: no label
    key: str  # path under the root without suffix, "/"-separated


def list_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, sorted; hidden files and folders skipped."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and is_image_file(p)
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _read_metadata(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number} is not JSON: {err}") from None
        return rows
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _is_int(value: object) -> bool:
    return isinstance(value, int) or str(value).lstrip("-").isdigit()


def class_folders(root: Path, images: Sequence[Path]) -> list[str]:
    """Class names when every image sits exactly one folder below ``root``; else []."""
    parents = {p.relative_to(root).parts[:-1] for p in images}
    if parents and all(len(parent) == 1 for parent in parents):
        return sorted(parent[0] for parent in parents)
    return []


def _metadata_captions_and_labels(root: Path) -> tuple[dict[Path, str], dict[Path, int | str]]:
    """Captions and labels from ``root``'s metadata file (if any), by image path; a row
    naming a missing file is an error."""
    captions: dict[Path, str] = {}
    labels: dict[Path, int | str] = {}
    metadata = next((root / n for n in METADATA_FILES if (root / n).is_file()), None)
    if metadata is None:
        return captions, labels
    missing = []
    for row in _read_metadata(metadata):
        if "file_name" not in row:
            raise ValueError(f"{metadata}: a row has no 'file_name': {row}")
        path = root / row["file_name"]
        if not path.is_file():
            missing.append(row["file_name"])
            continue
        text = next((row[k] for k in CAPTION_KEYS if row.get(k) is not None), None)
        if text is not None:
            captions[path] = str(text)
        if row.get("label") not in (None, ""):
            labels[path] = row["label"]
    if missing:
        raise ValueError(
            f"{metadata} names {len(missing)} file(s) that do not exist: "
            f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}"
        )
    return captions, labels


def scan_folder(
    root: str | Path,
    *,
    strict: bool = False,
    classes: Sequence[str] | None = None,
    caption_extension: str = ".txt",
) -> tuple[list[Record], list[str]]:
    """Records of every image under ``root`` and the class names ([] without classes).

    ``strict``: an image with no caption raises (listing them) instead of getting "".
    ``classes`` fixes the class order (shared by a dataset's splits).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such folder: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is a file; give the folder that holds the images")
    images = list_images(root)
    if not images:
        raise ValueError(
            f"no images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)"
        )
    captions, labels = _metadata_captions_and_labels(root)
    folder_classes = [] if labels else class_folders(root, images)
    named = sorted({str(v) for v in labels.values() if not _is_int(v)})  # class-name labels
    names = list(classes) if classes is not None else (named or folder_classes)
    records, uncaptioned = [], []
    for path in images:
        caption = captions.get(path)
        sidecar = path.with_suffix(caption_extension)
        if caption is None and sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8").strip()
        label = -1
        if path in labels:
            value = labels[path]
            label = int(value) if _is_int(value) else names.index(str(value))
        elif folder_classes:
            folder = path.relative_to(root).parts[0]
            if folder not in names:
                raise ValueError(f"class folder {folder!r} is not among the classes {names}")
            label = names.index(folder)
            if caption is None:
                caption = folder.replace("_", " ").replace("-", " ")
        if caption is None:
            uncaptioned.append(path)
        key = path.relative_to(root).with_suffix("").as_posix()
        records.append(Record(path, caption, label, key))
    if uncaptioned:
        listing = ", ".join(str(p.relative_to(root)) for p in uncaptioned[:20])
        if strict:
            raise ValueError(
                f"{len(uncaptioned)} image(s) under {root} have no caption (strict mode): "
                f"{listing}{' ...' if len(uncaptioned) > 20 else ''}. Add a "
                f"{caption_extension} file beside each, or a metadata.jsonl, or pass strict=False"
            )
        log.warning("%d image(s) under %s have no caption; they get ''", len(uncaptioned), root)
    return records, names


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) as the image will be decoded (EXIF rotation included), from its
    header alone."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112) in _ROTATED:
            width, height = height, width
    return height, width


class FolderDataset(Dataset):
    """One split of a captioned image folder; samples as the built-in datasets give."""

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        *,
        size: int = 256,  # output side (without buckets)
        crop: Crop = "center",
        flip: bool = False,
        strict: bool = False,  # an image without caption is an error, not ""
        bucket_area: int | None = None,  # e.g. 512 * 512: aspect-ratio buckets of that area
        bucket_multiple: int = 64,  # bucket sides are multiples of this
        bucket_max_ratio: float = 2.0,
    ):
        root = Path(path)
        check_split(split)
        if not root.exists():
            raise FileNotFoundError(f"no such folder: {root}")
        split_dirs = [s for s in SPLITS if (root / s).is_dir()]
        if split_dirs:
            if split not in split_dirs:
                raise ValueError(f"{root} has no {split}/ folder (it has {', '.join(split_dirs)})")
            folder = root / split
            # One class order for every split, even if a split lacks a class.
            classes = sorted(
                {c for s in split_dirs for c in class_folders(root / s, list_images(root / s))}
            )
        elif split == "train":
            folder, classes = root, None
        else:
            raise ValueError(
                f"{root} has no {split} split: add {split}/ (and train/) sub-folders, or make "
                f"fixed splits with `python -m ldm.data.prepare {root} OUT`"
            )
        self.records, self.classes = scan_folder(folder, strict=strict, classes=classes or None)
        self.transform = ImageTransform(size, crop=crop, flip=flip)
        self.buckets: list[tuple[int, int]] | None = None
        if bucket_area is not None:
            choices = make_buckets(bucket_area, bucket_multiple, bucket_max_ratio)
            self.buckets = [nearest_bucket(*image_size(r.path), choices) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        size = None if self.buckets is None else self.buckets[index]
        return {
            "image": self.transform(open_image(record.path), size),
            "caption": record.caption or "",
            "label": record.label,
            "key": record.key,
        }
