"""The bias audit: its statistics against scipy, the reference distributions of partial
shapes prompts, real draws scoring at the noise floor and a collapsed model far from it,
and ``evaluate.py audit=shapes|clip`` end to end on a tiny model."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy import stats

from ldm.app.audit import audit
from ldm.app.train import train
from ldm.data.builtin import SHAPE_ATTRIBUTES, ShapesDataset, parse_partial_shapes_caption
from ldm.metrics.audit import (
    ZeroShotLabeller,
    audit_prompts,
    chi_square,
    compare,
    generated_counts,
    shapes_reference,
    tv_floor,
)
from ldm.metrics.clip import OpenCLIPScore

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))
from testutils import run_cli  # noqa: E402
from trainutils import compose_train  # noqa: E402

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_chi_square_and_total_variation_match_scipy():
    a = torch.tensor([30.0, 10, 0, 5])
    b = torch.tensor([200.0, 150, 0, 120])
    statistic, dof, p = chi_square(a, b)
    want = stats.chi2_contingency([[30, 10, 5], [200, 150, 120]], correction=False)
    assert statistic == pytest.approx(want.statistic, rel=1e-9)
    assert dof == want.dof == 2
    assert p == pytest.approx(want.pvalue, rel=1e-6)
    assert chi_square(torch.tensor([5.0, 0]), torch.tensor([9.0, 0]))[1] == 0  # one class: no test
    # The floor: the mean TV of n draws from p itself, shrinking like 1 / sqrt(n).
    p_ref = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    small, large = tv_floor(p_ref, 25), tv_floor(p_ref, 2500)
    assert 0.05 < small < 0.2 and large == pytest.approx(small / 10, rel=0.25)


def test_partial_prompts_select_the_training_images_they_describe():
    assert parse_partial_shapes_caption("") == {}
    assert parse_partial_shapes_caption("a red shape on a black background") == {
        "colour": 0,
        "background": 1,
    }
    with pytest.raises(ValueError, match="not a shapes prompt"):
        audit_prompts(["a dog"], shapes=True)
    dataset = ShapesDataset("train", size=8, num_samples=[400, 8, 8])
    prompts = audit_prompts(["a circle", {"prompt": "a small shape on a white background"}], True)
    circle, small_white = shapes_reference(prompts, dataset)
    truth = [dataset.spec(i).classes for i in range(len(dataset))]
    circles = [t for t in truth if t["shape"] == 0]
    assert circle[2].tolist()[:5] == [len(circles), 0, 0, 0, 0]  # shape: all circles
    colours = torch.bincount(torch.tensor([t["colour"] for t in circles]), minlength=8)
    assert circle[1].tolist() == colours.double().tolist()
    chosen = [t for t in truth if t["size"] == 0 and t["background"] == 0]
    assert small_white[0].sum() == len(chosen) and small_white[1, 6] == 0  # never white on white


class _Truth:
    """A labeller that reads the exact attributes of the training image an 'image' encodes
    (its index in two pixels): the audit's statistics without a classifier's errors."""

    def __init__(self, dataset: ShapesDataset):
        self.dataset, self.attributes = dataset, {k: list(v) for k, v in SHAPE_ATTRIBUTES.items()}

    def predict(self, images):
        index = images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()
        specs = [self.dataset.spec(int(i)).classes for i in index]
        return {name: torch.tensor([s[name] for s in specs]) for name in self.attributes}


def _encoded(indices):
    images = torch.zeros(len(indices), 3, 2, 2)
    for row, i in enumerate(indices):
        images[row, 0, 0, 0], images[row, 0, 0, 1] = i // 256, i % 256
    return images / 127.5 - 1  # to_uint8 maps these back to the same integers


def test_real_draws_score_at_the_floor_and_a_collapsed_model_far_from_it():
    dataset = ShapesDataset("train", size=8, num_samples=[4000, 8, 8])
    prompts = audit_prompts(["", "a circle"], shapes=True)
    reference = shapes_reference(prompts, dataset)
    truth = [dataset.spec(i).classes for i in range(len(dataset))]
    pools = {
        p.prompt: [i for i, t in enumerate(truth) if t.items() >= p.asked.items()] for p in prompts
    }
    rng = torch.Generator().manual_seed(1)

    def faithful(captions, indices):  # training images the prompt describes, drawn at random
        pool = pools[captions[0]]
        picks = torch.randint(len(pool), (len(indices),), generator=rng)
        return _encoded([pool[int(k)] for k in picks])

    labeller = _Truth(dataset)
    counts, kept = generated_counts(faithful, prompts, labeller, 300, batch_size=64, keep=3)
    assert counts.shape == (2, 5, 8) and (counts.sum(2) == 300).all()
    assert [len(k) for k in kept] == [3, 3]
    rows = compare(prompts, counts, reference, labeller.attributes)
    tested = [r for r in rows if "p_value" in r]
    assert len(tested) == 5 + 4  # the circle's shape is asked: reported, not tested
    assert all(r["tv"] < 3 * r["tv_floor"] for r in tested)
    assert not any(r["significant"] for r in tested)
    asked = next(r for r in rows if r["asked"] == "circle")
    assert asked["tv"] == 0 and asked["generated"]["circle"] == 1

    def collapsed(captions, indices):  # one training image, whatever the prompt
        return _encoded([pools[captions[0]][0]] * len(indices))

    counts, _ = generated_counts(collapsed, prompts, labeller, 300, batch_size=64)
    rows = compare(prompts, counts, reference, labeller.attributes)
    assert all(r["significant"] and r["tv"] > 0.4 for r in rows if "p_value" in r)


def test_zero_shot_labels_are_the_nearest_label_text():
    torch.manual_seed(0)
    clip = OpenCLIPScore(model_config=TINY_CLIP)
    labeller = ZeroShotLabeller(clip, {"colour": ["red", "green", "blue"]}, "a {} thing")
    images = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8)
    texts = clip.text_embeddings(["a red thing", "a green thing", "a blue thing"])
    want = (clip.image_embeddings(images) @ texts.T).argmax(1)
    assert labeller.predict(images)["colour"].tolist() == want.tolist()
    with pytest.raises(ValueError, match="two or more labels"):
        ZeroShotLabeller(clip, {"colour": ["red"]})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("ldm")
    train(compose_train(run, "trainer.max_steps=2"), run)
    return run / "checkpoints" / "last.ckpt"


def _hydra(value) -> str:
    """A dict in Hydra's override syntax."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra(v)}" for k, v in value.items()) + "}"
    return str(value)


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


BASE = ["data.dataset.size=16", "data.dataset.num_samples=[64,16,16]", "image_size=16"]
BASE += ["batch_size=5", "grid.steps=[2]", "audit.samples_per_prompt=7"]


def test_evaluate_audits_shapes_prompts_with_the_attribute_classifier(checkpoint, tmp_path):
    cfg = _compose(
        *BASE,
        f"checkpoint={checkpoint}",
        f"cache_dir={tmp_path / 'cache'}",
        "audit=shapes",
        "audit.prompts=['',a red shape]",
        "attribute_classifier={train_count:600,held_out_count:100,epochs:1}",
        "grid.guidance=[1.0,3.0]",
    )
    results = audit(cfg, tmp_path / "out")
    assert len(results) == 2  # one audit per grid point
    rows = next(iter(results.values()))
    assert len(rows) == 2 * 5 and all(r["n"] == 7 for r in rows)
    assert [r["asked"] for r in rows if r["asked"]] == ["red"]
    names = {p.name for p in (tmp_path / "out").iterdir()}
    stem = "audit_ddim_eta0_trailing_g3_steps2"
    assert {f"{stem}.md", f"{stem}.json", f"{stem}.png", f"{stem}_samples.png"} <= names
    saved = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
    assert saved["meta"]["audit"]["labeller"] == "shapes" and len(saved["rows"]) == 10
    assert "a red shape | colour (asked: red)" in (tmp_path / "out" / f"{stem}.md").read_text()


def test_evaluate_audits_any_caption_data_with_clip_zero_shot_labels(checkpoint, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "clip.pt"
    torch.save(OpenCLIPScore(model_config=TINY_CLIP).model.state_dict(), weights)
    overrides = [
        *BASE,
        f"checkpoint={checkpoint}",
        "audit=clip",
        "audit.attributes={colour:[red,blue,green],background:[white,black]}",
        f"+audit.clip.model_config={_hydra(TINY_CLIP)}",
        f"audit.clip.weights_path={weights}",
        "audit.reference_count=40",
    ]
    cfg = _compose(*overrides, "audit.prompts=[a circle,{prompt:a square,captions:square}]")
    rows = audit(cfg, tmp_path / "out")["ddim, eta 0, trailing, guidance 3"]
    assert [(r["prompt"], r["attribute"]) for r in rows] == [
        ("a circle", "colour"),
        ("a circle", "background"),
        ("a square", "colour"),
        ("a square", "background"),
    ]
    dataset = ShapesDataset("train", size=16, num_samples=[64, 16, 16])
    squares = sum("square" in dataset.spec(i).caption for i in range(40))
    assert rows[0]["reference_n"] == 40 and rows[2]["reference_n"] == squares
    assert (tmp_path / "out" / "audit.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="caption matches 'hexagon'"):
        audit(_compose(*overrides, "audit.prompts=[{prompt:x,captions:hexagon}]"), tmp_path / "x")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["audit=clip"], "error: audit.prompts is required: add audit.prompts=..."),
        (["audit=shapes", "audit.prompts=[a dog]"], "error: 'a dog' is not a shapes prompt"),
    ],
)
def test_bad_audit_settings_are_one_line_before_any_work(args, message, tmp_path):
    done = run_cli(
        ["evaluate.py", "checkpoint=unread.ckpt", *args],
        cwd=ROOT,
        env={**os.environ, "LDM_OUTPUT_DIR": str(tmp_path)},
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-2000:]
