"""The shapes attribute judge: captions parse to the exact attributes of their images, real
held-out images score at the classifier's ceiling with their own captions and near chance
with shuffled ones, the classifier is cached, and the metric's sums are order-free."""

import pytest
import torch

from ldm.data.builtin import SHAPE_ATTRIBUTES, ShapesDataset, parse_shapes_caption
from ldm.metrics import attributes
from ldm.metrics.attributes import (
    AttributeAccuracy,
    attribute_judge,
    is_shapes_caption,
    shapes_images,
    shapes_judge,
)

# Small enough for a few seconds here; the default settings reach 100% (docs/evaluation.md).
TINY = {"train_count": 4000, "held_out_count": 600, "epochs": 8, "lr": 5e-3}
pytestmark = pytest.mark.xdist_group("attributes")  # one worker: the judge is trained once


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def judge(cache):
    return shapes_judge(16, cache, **TINY)


def test_captions_name_exactly_what_the_images_show():
    dataset = ShapesDataset("val", size=16)
    for index in range(300):
        spec = dataset.spec(index)
        assert parse_shapes_caption(spec.caption) == spec.classes
        assert dataset[index]["caption"] == spec.caption
    with pytest.raises(ValueError, match="a huge red circle"):
        parse_shapes_caption("a huge red circle in the center on a white background")
    assert not is_shapes_caption("a photo of a cat") and not is_shapes_caption(None)


def test_real_images_score_at_the_ceiling_and_shuffled_captions_near_chance(judge):
    images, targets, captions = shapes_images("val", TINY["held_out_count"], 16)
    own = judge.score(images, captions)
    assert own == pytest.approx(judge.ceiling, abs=1e-12)  # the ceiling is this very score
    assert min(own[n] for n in SHAPE_ATTRIBUTES) > 0.75 and own["joint"] > 0.75
    shuffled = [captions[i] for i in torch.randperm(len(captions), generator=torch.Generator())]
    score = judge.score(images, shuffled)
    n = len(captions)
    for name in SHAPE_ATTRIBUTES:
        # Chance: the probability that two independent samples share the class.
        share = torch.bincount(targets[name]).double() / n
        chance = float(share.square().sum())
        assert abs(score[name] - chance) < 4 * (chance * (1 - chance) / n) ** 0.5 + 0.02, name
    assert score["joint"] < 0.05


def test_the_classifier_is_cached_by_its_training_images_and_settings(judge, cache, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(attributes, "train_classifier", refuse)
    again = shapes_judge(16, cache, **TINY)  # the fixture trained it into this folder
    images, _, _ = shapes_images("test", 64, 16)
    assert again.ceiling == judge.ceiling
    for name in SHAPE_ATTRIBUTES:
        assert torch.equal(
            again.classifier.predict(images)[name], judge.classifier.predict(images)[name]
        )
    with pytest.raises(AssertionError, match="trained again"):  # other settings: a new one
        shapes_judge(16, cache, **(TINY | {"epochs": 1}))
    assert len(list(cache.glob("attributes-*.safetensors"))) == 1


def test_training_is_deterministic(tmp_path):
    settings = TINY | {"train_count": 500, "epochs": 1, "held_out_count": 100}
    a = shapes_judge(16, tmp_path / "a", **settings)
    b = shapes_judge(16, tmp_path / "b", **settings)
    theirs = b.classifier.state_dict()
    for name, tensor in a.classifier.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


def test_the_metric_is_a_sum_over_batches_in_any_order(judge):
    images, _, captions = shapes_images("test", 90, 16)
    captions = captions[:45] + [captions[i] for i in reversed(range(45, 90))]  # half wrong
    whole = judge.score(images, captions)
    metric = AttributeAccuracy(judge.attributes)
    for chunk in reversed(range(0, 90, 20)):
        metric.update(judge.correct(images[chunk : chunk + 20], captions[chunk : chunk + 20]))
    result = metric.compute()
    intervals = {"attr_joint_ci_low", "attr_joint_ci_high"}  # Wilson, 95%
    assert set(result) == {f"attr_{n}" for n in [*SHAPE_ATTRIBUTES, "joint"]} | intervals
    assert result["attr_joint_ci_low"] < result["attr_joint"] < result["attr_joint_ci_high"]
    for name, value in whole.items():
        assert result[f"attr_{name}"] == pytest.approx(value, abs=1e-12)


def test_images_of_another_size_are_resized_and_bad_input_refused(judge):
    images, _, captions = shapes_images("val", 50, 32)
    score = judge.score(images, captions)  # 32 px images, a 16 px classifier
    assert score["background"] > 0.9
    with pytest.raises(ValueError, match="uint8"):
        judge.score(images.float(), captions)
    with pytest.raises(ValueError, match="50 images for 49 captions"):
        judge.correct(images, captions[:49])


def test_auto_judges_only_caption_models_on_shapes_captions(tmp_path):
    class Captions:
        input_key = "caption"

    class Labels:
        input_key = "label"

    shapes = [{"caption": "a large red circle in the center on a white background"}]
    cats = [{"caption": "a photo of a cat"}]
    assert attribute_judge("auto", cats, 16, tmp_path, Captions()) is None
    assert attribute_judge("auto", shapes, 16, tmp_path, Labels()) is None
    assert attribute_judge(False, shapes, 16, tmp_path, Captions()) is None
    with pytest.raises(ValueError, match=r"attributes=true needs .* 'a photo of a cat'"):
        attribute_judge(True, cats, 16, tmp_path, Captions())
    with pytest.raises(ValueError, match="use auto, true or false"):
        attribute_judge("sometimes", shapes, 16, tmp_path, Captions())
    assert not list(tmp_path.iterdir())  # nothing was trained
