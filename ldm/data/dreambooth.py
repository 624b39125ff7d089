"""DreamBooth data (Ruiz et al. 2023): a few instance images with one prompt naming the
subject by a rare identifier, interleaved with class images under the class prompt for the
prior-preservation loss.

Samples alternate instance, class, instance, class, ...; each carries ``loss_weight``: 1
for instance images, ``prior_loss_weight`` for class images. Without class images (or with
``prior_loss_weight=0``) only instance samples are served (Textual Inversion uses it that
way). val / test serve the instance images.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ldm.data.builtin import Sample, check_split
from ldm.data.folder import list_images
from ldm.data.images import open_image
from ldm.data.transforms import Crop, ImageTransform


class DreamBoothDataset(Dataset):
    def __init__(
        self,
        split: str = "train",
        *,
        instance_dir: str | Path,  # 3-5 images of the subject
        instance_prompt: str,  # e.g. "a photo of sks dog"
        class_dir: str | Path | None = None,  # images of the class (generated if too few)
        class_prompt: str | None = None,  # e.g. "a photo of a dog"; None: no prior loss
        prior_loss_weight: float = 1.0,  # weight of the class images' loss
        size: int = 512,
        crop: Crop = "center",
        flip: bool = False,
    ):
        check_split(split)
        self.instances = list_images(Path(instance_dir))
        if not self.instances:
            raise ValueError(f"no instance images in {instance_dir}")
        self.classes: list[Path] = []
        if split == "train" and class_dir is not None and class_prompt and prior_loss_weight > 0:
            folder = Path(class_dir)
            self.classes = list_images(folder) if folder.is_dir() else []
            if not self.classes:
                raise ValueError(
                    f"no class images in {class_dir}: generate them first (train.py does, with "
                    "dreambooth.class_images) or set prior_loss_weight=0"
                )
        self.instance_prompt, self.class_prompt = instance_prompt, class_prompt
        self.prior_loss_weight = prior_loss_weight
        self.transform = ImageTransform(size, crop=crop, flip=flip)

    def __len__(self) -> int:
        if not self.classes:
            return len(self.instances)
        return 2 * max(len(self.instances), len(self.classes))

    def __getitem__(self, index: int) -> Sample:
        if self.classes and index % 2:
            path = self.classes[(index // 2) % len(self.classes)]
            caption, weight, kind = self.class_prompt, self.prior_loss_weight, "class"
        else:
            step = 2 if self.classes else 1
            path = self.instances[(index // step) % len(self.instances)]
            caption, weight, kind = self.instance_prompt, 1.0, "instance"
        return {
            "image": self.transform(open_image(path)),
            "caption": caption,
            "label": -1,
            "key": f"{kind}/{path.name}/{index}",
            "loss_weight": float(weight),
        }
