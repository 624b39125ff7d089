"""The model side of the service in-process: class labels, sizes, and the bearer token's
sources."""

import io

import pytest
import torch
from omegaconf import OmegaConf

from ldm.app.serve import model_overrides, read_token
from ldm.diffusion.schedules import make_schedule
from ldm.models.conditioners import ClassEmbedder
from ldm.models.unet import UNet
from ldm.nn.lora import adapter_weights, inject_lora
from ldm.pipeline import Pipeline
from ldm.serving.api import ImageRequest, _parse
from ldm.serving.batcher import Job
from ldm.serving.service import BadRequest, ImageService, to_png


@pytest.fixture(scope="module")
def service():
    """A class-conditioned pixel-space pipeline (no VAE), untrained."""
    torch.manual_seed(0)
    unet = UNet(in_channels=3, out_channels=3, model_channels=16, channel_multipliers=[1, 2],
                blocks_per_level=1, attention_levels=[1], num_heads=2, context_dim=None,
                num_classes=11, norm_groups=8, mid_attention=False)  # fmt: skip
    pipeline = Pipeline(unet, ClassEmbedder(10, dim=None), None, make_schedule("linear"),
                        image_size=(8, 8))  # fmt: skip
    return ImageService(pipeline.eval(), checkpoint="untrained", sizes=[8, 16])


def _run(service, **body):
    settings, work = _parse(service, ImageRequest(**body))
    (pngs,) = service.run([Job(settings, len(work.seeds), work, None)])
    return settings, work, pngs


def test_labels_sizes_and_seeds(service):
    settings, work, pngs = _run(service, labels=[3, 7], n=2, seed=5, steps=2, size=16)
    assert work.inputs == [3, 3, 7, 7] and work.seeds == [5, 6, 5, 6]
    assert settings.size == (16, 16) and len(pngs) == 4
    assert pngs[0] != pngs[2]  # another label, the same seed
    _, _, again = _run(service, labels=[3], seed=5, steps=2, size=16)
    assert again[0] == pngs[0]
    assert service.describe()["conditioning"] == "label"
    with pytest.raises(BadRequest, match="give labels"):
        _parse(service, ImageRequest(prompt="a cat"))
    with pytest.raises(BadRequest, match="not served"):
        _parse(service, ImageRequest(labels=[1], size=12))
    for body, field in (
        ({"labels": [3, 10]}, "labels.1"),  # 10 classes: 0..9
        ({"labels": []}, "labels"),
        ({"labels": [1], "negative_prompt": "a dog"}, "negative_prompt"),
    ):
        with pytest.raises(BadRequest) as err:
            _parse(service, ImageRequest(**body))
        assert err.value.field == field


def test_sizes_must_suit_the_model(service):
    with pytest.raises(ValueError, match="not a multiple of 2"):
        ImageService(service.pipeline, checkpoint="x", sizes=[9])


def test_the_token_comes_from_an_environment_variable_or_a_file(tmp_path, monkeypatch):
    def cfg(**kw):
        return OmegaConf.create({"token_env": None, "token_file": None, **kw})

    assert read_token(cfg()) is None
    monkeypatch.setenv("LDM_TEST_TOKEN", "abc")
    assert read_token(cfg(token_env="LDM_TEST_TOKEN")) == "abc"
    (tmp_path / "t").write_text("xyz\n")
    assert read_token(cfg(token_file=str(tmp_path / "t"))) == "xyz"
    with pytest.raises(ValueError, match="not both"):
        read_token(cfg(token_env="LDM_TEST_TOKEN", token_file=str(tmp_path / "t")))
    monkeypatch.setenv("LDM_TEST_TOKEN", "")
    with pytest.raises(ValueError, match="empty"):
        read_token(cfg(token_env="LDM_TEST_TOKEN"))


def test_a_response_png_is_the_file_sample_py_writes():
    """to_png rounds as torchvision's save_image (sample.py's files) without importing it."""
    from PIL import Image
    from torchvision.utils import save_image

    noise = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0))
    image = torch.cat([torch.linspace(-1.2, 1.2, 3 * 8 * 8).reshape(3, 8, 8), noise], 1)
    theirs = io.BytesIO()
    save_image(image * 0.5 + 0.5, theirs, format="png")
    ours = Image.open(io.BytesIO(to_png(image)))
    assert ours.size == (8, 16) and ours.tobytes() == Image.open(theirs).tobytes()


def test_the_checkpoints_own_adapter_stays_on_and_the_sample_line_names_the_vae(tmp_path):
    """A LoRA fine-tune's own adapter (injected when the checkpoint is read) is part of the
    model: requests that name no adapters keep it at its weight."""
    torch.manual_seed(0)
    unet = UNet(in_channels=3, out_channels=3, model_channels=16, channel_multipliers=[1, 2],
                blocks_per_level=1, attention_levels=[1], num_heads=2, context_dim=None,
                num_classes=11, norm_groups=8, mid_attention=False)  # fmt: skip
    inject_lora(unet, "tuned", rank=2)
    pipeline = Pipeline(unet, ClassEmbedder(10, dim=None), None, make_schedule("linear"),
                        image_size=(8, 8))  # fmt: skip
    service = ImageService(pipeline.eval(), checkpoint="tuned")
    _run(service, labels=[1], steps=2)
    assert adapter_weights(unet) == {"tuned": 1.0}
    vae = tmp_path / "vae.ckpt"
    vae.touch()
    lines = model_overrides(OmegaConf.create({"ema": True, "vae": str(vae)}))
    assert lines[0] == f"vae={vae}"  # then the command line's model overrides, if any


def test_an_unconditional_model_refuses_prompts_and_labels():
    unet = UNet(in_channels=3, out_channels=3, model_channels=16, channel_multipliers=[1, 2],
                blocks_per_level=1, attention_levels=[], context_dim=None, norm_groups=8,
                mid_attention=False)  # fmt: skip
    pipeline = Pipeline(unet, None, None, make_schedule("linear"), image_size=(8, 8))
    service = ImageService(pipeline.eval(), checkpoint="unconditional")
    assert len(_run(service, n=2, steps=2)[2]) == 2
    larger = ImageService(pipeline, checkpoint="unconditional", sizes=[16])
    with pytest.raises(BadRequest, match=r"give size: .*\(16, 16\)"):
        _parse(larger, ImageRequest())
    assert _parse(larger, ImageRequest(size=16))[0].size == (16, 16)
    for body in ({"prompt": "a cat"}, {"labels": [1]}, {"negative_prompt": "a dog"}):
        with pytest.raises(BadRequest, match="unconditional") as err:
            _parse(service, ImageRequest(**body))
        assert err.value.field == next(iter(body))
