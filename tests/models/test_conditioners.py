"""Conditioners: the OpenCLIP tower against open_clip's own CLIP, weights found offline or
refused with one message, the from-scratch encoder's padding invariance and training, the
class embedder's null class, caption / label dropout rates, and the dict interface the UNet
and classifier-free guidance take."""

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ldm.diffusion.guidance import cfg
from ldm.io import save_safetensors
from ldm.models.conditioners import (
    ClassEmbedder,
    TransformerTextEncoder,
    drop_conditioning,
)
from ldm.models.openclip import OpenCLIPTextEncoder, find_openclip_weights
from ldm.models.unet import UNet
from ldm.pipeline import open_checkpoint

# A small open_clip text tower (ViT-H-14's has width 1024, 24 layers, embed_dim 1024).
SMALL = {
    "embed_dim": 32,
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
TINY_VISION = {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32}
CAPTIONS = ["a photo of a cat", "an oil painting of a lighthouse at dusk", ""]
VIT_H_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # open_clip's ViT-H-14 laion2b_s32b_b79k


def small_clip(**kwargs) -> OpenCLIPTextEncoder:
    torch.manual_seed(0)
    return OpenCLIPTextEncoder("ViT-H-14", model_config=SMALL, **kwargs)


@pytest.fixture(scope="module")
def encoder() -> OpenCLIPTextEncoder:
    return small_clip(pooled=True)


def open_clip_reference(encoder: OpenCLIPTextEncoder) -> nn.Module:
    """open_clip's own CLIP (tiny vision tower) holding the encoder's text weights."""
    model = open_clip.model.CLIP(SMALL["embed_dim"], TINY_VISION, SMALL["text_cfg"]).eval()
    result = model.load_state_dict(encoder.model.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(key.startswith("visual.") for key in result.missing_keys)
    return model


def assert_same_outputs(a: OpenCLIPTextEncoder, b: OpenCLIPTextEncoder) -> None:
    with torch.no_grad():
        for x, y in zip(a.encode(CAPTIONS), b.encode(CAPTIONS), strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


# --------------------------------------------------------------------------- OpenCLIP


def test_openclip_shapes_and_keys(encoder):
    with torch.no_grad():
        out = encoder(CAPTIONS)
    assert set(out) == {"context", "pooled"}
    assert out["context"].shape == (3, 77, 64) and out["context"].dtype == torch.float32
    assert out["pooled"].shape == (3, 32)
    assert set(small_clip()(CAPTIONS[:1])) == {"context"}  # SD 2.x UNets take no pooled
    assert small_clip(max_length=16)(CAPTIONS)["context"].shape == (3, 16, 64)
    # open_clip's names under model.: SD 2.x's cond_stage_model.* minus the prefix.
    keys = set(encoder.state_dict())
    assert {
        "model.token_embedding.weight",
        "model.positional_embedding",
        "model.transformer.resblocks.0.attn.in_proj_weight",
        "model.transformer.resblocks.2.mlp.c_proj.bias",
        "model.ln_final.weight",
        "model.text_projection",
        "model.logit_scale",
    } <= keys
    assert not any("visual" in key or "attn_mask" in key for key in keys)
    assert encoder.model.attn_mask.shape == (77, 77)


def test_openclip_frozen_stays_eval():
    encoder = small_clip()
    parent = nn.Sequential(encoder, nn.Linear(1, 1)).train()
    assert not encoder.training
    assert not any(module.training for module in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder(CAPTIONS)["context"].requires_grad
    assert parent[1].training
    trainable = small_clip(freeze=False).train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
    assert trainable(CAPTIONS)["context"].requires_grad


def test_openclip_matches_open_clip(encoder):
    reference = open_clip_reference(encoder)
    last = small_clip(layer="last", pooled=True)
    last.load_state_dict(encoder.state_dict())
    tokens = encoder.tokenize(CAPTIONS)
    with torch.no_grad():
        context_last, pooled_last = last.encode(CAPTIONS)
        context_pen, pooled_pen = encoder.encode(CAPTIONS)
        x = reference.token_embedding(tokens) + reference.positional_embedding
        final, states = reference.transformer.forward_intermediates(
            x, attn_mask=reference.attn_mask, indices=[1]
        )
        encode_text = reference.encode_text(tokens)
    # Independent float kernels on separately allocated weights: agreement to rounding.
    torch.testing.assert_close(context_last, reference.ln_final(final), rtol=0, atol=1e-5)
    torch.testing.assert_close(context_pen, reference.ln_final(states[0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled_last, encode_text, rtol=0, atol=1e-5)
    # Pooled is encode_text's whichever layer the tokens come from.
    torch.testing.assert_close(pooled_pen, pooled_last, rtol=0, atol=0)
    assert (context_pen - context_last).abs().max() > 0.1


def test_tokenization_offline(no_network, encoder):
    tokens = encoder.tokenize(CAPTIONS)
    assert tokens.dtype == torch.int64 and tokens.shape == (3, 77)
    torch.testing.assert_close(tokens, open_clip.get_tokenizer("ViT-H-14")(CAPTIONS))
    sot, eot = encoder.tokenizer.sot_token_id, encoder.tokenizer.eot_token_id
    assert tokens[2, :3].tolist() == [sot, eot, 0]
    long = encoder.tokenize(["word " * 200])
    assert long[0, -1] == eot and (long[0] != 0).all()
    assert [encoder.token_count(c) for c in CAPTIONS] == (tokens != 0).sum(1).tolist()
    assert encoder.token_count("word " * 200) == 202  # what tokenize cuts to 77
    assert TransformerTextEncoder(width=32, depth=1)(CAPTIONS)["context"].shape == (3, 77, 32)


def test_eot_padding_keeps_real_tokens(encoder):
    """SD 1.x pads with EOT: the ids after the first EOT change, the caption's do not, and
    the causal tower's states up to EOT stay the same."""
    padded = small_clip(pad_with_eot=True)
    zeros, eots = encoder.tokenize(CAPTIONS), padded.tokenize(CAPTIONS)
    eot = encoder.tokenizer.eot_token_id
    for row_zero, row_eot in zip(zeros, eots, strict=True):
        end = int((row_zero == eot).nonzero()[0]) + 1
        assert torch.equal(row_eot[:end], row_zero[:end])
        assert (row_eot[end:] == eot).all() and (row_zero[end:] == 0).all()
    with torch.no_grad():
        a, b = encoder.encode_tokens(zeros, False)[0], encoder.encode_tokens(eots, False)[0]
    assert not torch.allclose(a, b)  # the padded positions differ ...
    torch.testing.assert_close(a[0, :6], b[0, :6])  # ... the caption's do not


def test_captions_checked(encoder):
    with pytest.raises(TypeError, match="list of captions"):
        encoder("a single string")
    with pytest.raises(ValueError, match="caption 1 of the batch is None"):
        encoder(["fine", None])


def test_unsupported_towers_refused(no_network):
    with pytest.raises(ValueError, match="Hugging Face, SigLIP or CoCa"):
        OpenCLIPTextEncoder("xlm-roberta-base-ViT-B-32")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        OpenCLIPTextEncoder("ViT-Nonexistent-1")
    with pytest.raises(ValueError, match="not both"):
        OpenCLIPTextEncoder("ViT-H-14", "laion2b_s32b_b79k", weights_path="w.safetensors")


def test_missing_pretrained_weights_one_clear_error(no_network, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        find_openclip_weights("ViT-H-14", "laion2b_s32b_b79k", cache_dir=tmp_path)
    message = str(info.value)
    for needed in (
        "ViT-H-14 / laion2b_s32b_b79k",
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
        VIT_H_REPO,
        str(tmp_path),
        "weights_path",
    ):
        assert needed in message
    # The encoder fails the same way, before building anything.
    with pytest.raises(FileNotFoundError, match="laion2b_s32b_b79k"):
        OpenCLIPTextEncoder("ViT-H-14", "laion2b_s32b_b79k", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="laion2b_s32b_b79k"):  # known tags listed
        find_openclip_weights("ViT-H-14", "no_such_tag", cache_dir=tmp_path)


def test_pretrained_tag_from_local_hf_cache(no_network, tmp_path, encoder):
    """A file where huggingface_hub's cache keeps it is found and loaded, offline."""
    repo = tmp_path / f"models--{VIT_H_REPO.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    # open_clip's own checkpoint layout: the whole CLIP, vision tower included.
    full = open_clip_reference(encoder).state_dict()
    save_safetensors(snapshot / "open_clip_model.safetensors", full)
    path = find_openclip_weights("ViT-H-14", "laion2b_s32b_b79k", cache_dir=tmp_path)
    assert path.name == "open_clip_model.safetensors"
    loaded = OpenCLIPTextEncoder(
        "ViT-H-14", "laion2b_s32b_b79k", cache_dir=tmp_path, model_config=SMALL, pooled=True
    )
    assert_same_outputs(loaded, encoder)


def test_local_weights_files(tmp_path, encoder):
    # Our own state dict, as safetensors.
    path = save_safetensors(tmp_path / "text.safetensors", encoder.state_dict())
    assert_same_outputs(small_clip(weights_path=path, pooled=True), encoder)
    # An open_clip checkpoint (vision keys ignored), as a weights-only pickle.
    torch.save(open_clip_reference(encoder).state_dict(), tmp_path / "open_clip.bin")
    assert_same_outputs(small_clip(weights_path=tmp_path / "open_clip.bin", pooled=True), encoder)
    # Something else.
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="holds no CLIP text tower"):
        small_clip(weights_path=tmp_path / "other.safetensors")


def test_sd2_checkpoint_layout(tmp_path, encoder):
    """SD 2.x keeps the tower under cond_stage_model.model.*: stripping the prefix fits."""
    sd2 = {f"cond_stage_model.{k}": v for k, v in encoder.state_dict().items()}
    sd2["model.diffusion_model.out.2.weight"] = torch.zeros(4, 320, 3, 3)
    path = save_safetensors(tmp_path / "sd2.safetensors", sd2)
    fresh = small_clip(pooled=True)
    open_checkpoint(path).conditioner(given=fresh)  # the checkpoint reader, strict
    assert_same_outputs(fresh, encoder)
    assert_same_outputs(small_clip(weights_path=path, pooled=True), encoder)


def test_sd1_transformers_layout_matches_transformers(tmp_path):
    """SD 1.x keeps its tower as a transformers CLIPTextModel: converted, our encoder gives
    transformers' last hidden state; from an SD 1.x-style file and from a lone text model."""
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=32,
    )
    torch.manual_seed(0)
    reference = transformers.CLIPTextModel(config).eval()
    for p in reference.parameters():  # move layer norms and biases off their init too
        p.data.add_(0.05 * torch.randn_like(p))
    small = {**SMALL, "text_cfg": {**SMALL["text_cfg"], "layers": 3}, "quick_gelu": True}
    ours = OpenCLIPTextEncoder(
        "ViT-L-14-quickgelu", model_config=small, layer="last", pad_with_eot=True
    )
    state = reference.state_dict()  # transformers >= 5 drops "text_model." in memory
    files = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    sd1 = {f"cond_stage_model.transformer.{k}": v for k, v in files.items()}  # as SD 1.x
    sd1["model.diffusion_model.out.2.weight"] = torch.zeros(4, 320, 3, 3)
    open_checkpoint(save_safetensors(tmp_path / "sd1.safetensors", sd1)).conditioner(given=ours)
    tokens = ours.tokenize(CAPTIONS)
    with torch.no_grad():
        want = reference(input_ids=tokens).last_hidden_state
        got = ours(CAPTIONS)["context"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    lone = save_safetensors(tmp_path / "text_encoder.safetensors", reference.state_dict())
    again = OpenCLIPTextEncoder(
        "ViT-L-14-quickgelu",
        model_config=small,
        layer="last",
        pad_with_eot=True,
        weights_path=lone,
    )
    with torch.no_grad():
        assert torch.equal(again(CAPTIONS)["context"], got)
    with pytest.raises(ValueError, match="no text projection"):  # CLIPTextModel has none
        OpenCLIPTextEncoder(
            "ViT-L-14-quickgelu", model_config=small, pooled=True, weights_path=lone
        )


# --------------------------------------------------------------------------- from scratch


def test_transformer_text_encoder_shapes():
    torch.manual_seed(0)
    encoder = TransformerTextEncoder(width=32, depth=2, heads=4, pooled=True)
    out = encoder(CAPTIONS)
    assert out["context"].shape == (3, 77, 32) and out["pooled"].shape == (3, 32)
    assert encoder.token_embedding.num_embeddings == 49408
    assert set(TransformerTextEncoder(width=32, depth=1)(CAPTIONS)) == {"context"}
    with pytest.raises(ValueError, match="divisible"):
        TransformerTextEncoder(width=30, heads=4)


def test_padding_changes_no_real_token():
    torch.manual_seed(0)
    encoder = TransformerTextEncoder(width=32, depth=2, heads=4).eval()
    tokens = encoder.tokenize(CAPTIONS)  # (3, 77); the longest caption ends before 14
    real = torch.arange(77) <= tokens.argmax(dim=-1)[:, None]  # SOT..EOT
    noisy = torch.where(real, tokens, torch.randint(0, 49406, tokens.shape))
    with torch.no_grad():
        full, pooled = encoder.encode_tokens(tokens)
        short, pooled_short = encoder.encode_tokens(tokens[:, :14])
        other, pooled_other = encoder.encode_tokens(noisy)
    real14 = real[:, :14]
    for states in (short, other[:, :14]):
        torch.testing.assert_close(states[real14], full[:, :14][real14], atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled_short, pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled_other, pooled, atol=1e-5, rtol=0)


def test_transformer_text_encoder_trains():
    """A linear probe on the pooled state learns which animal a caption names."""
    torch.manual_seed(0)
    encoder = TransformerTextEncoder(width=32, depth=2, heads=4, pooled=True)
    head = nn.Linear(32, 2)
    captions = [
        f"a {kind} photo of a {animal}" for kind in ("big", "red") for animal in ("cat", "dog")
    ]
    labels = torch.tensor([0, 1, 0, 1])
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(25):
        loss = nn.functional.cross_entropy(head(encoder(captions)["pooled"]), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # The probe alone, on the untrained encoder, ends near 0.5 after as many steps.
    assert losses[-1] < 0.1 * losses[0]


# --------------------------------------------------------------------------- classes


def test_class_embedder_null_class():
    torch.manual_seed(0)
    embedder = ClassEmbedder(10, 16)
    assert embedder.embedding.num_embeddings == 11
    labels = torch.tensor([0, 3, 9])
    out = embedder(labels)
    assert set(out) == {"context"} and out["context"].shape == (3, 1, 16)
    torch.testing.assert_close(out["context"][:, 0], embedder.embedding.weight[labels])
    empty = embedder.empty(4)["context"]
    assert empty.shape == (4, 1, 16)
    torch.testing.assert_close(empty[:, 0], embedder.embedding.weight[10].expand(4, 16))
    passthrough = ClassEmbedder(10, dim=None)
    assert list(passthrough.parameters()) == []
    assert passthrough(labels)["y"].tolist() == [0, 3, 9]
    assert passthrough.empty(2)["y"].tolist() == [10, 10]
    with pytest.raises(ValueError, match=r"in \[0, 9\]"):
        embedder(torch.tensor([11]))
    with pytest.raises(ValueError, match="integer"):
        embedder(torch.tensor([1.0]))


# --------------------------------------------------------------------------- dropout


def test_drop_rates():
    generator = torch.Generator().manual_seed(0)
    captions = ["a caption"] * 10_000
    dropped = drop_conditioning(captions, 0.1, "", generator).count("")
    assert abs(dropped - 1000) < 4 * (10_000 * 0.1 * 0.9) ** 0.5
    assert drop_conditioning(captions, 0.0, "", generator) == captions
    assert drop_conditioning(captions, 1.0, "", generator) == [""] * 10_000
    embedder = ClassEmbedder(5, dim=None)
    labels = torch.randint(0, 5, (10_000,), generator=generator)
    out = embedder(labels, drop_prob=0.25, generator=generator)["y"]
    null = out == 5
    assert abs(null.sum().item() - 2500) < 4 * (10_000 * 0.25 * 0.75) ** 0.5
    assert torch.equal(out[~null], labels[~null])
    assert torch.equal(embedder(labels, drop_prob=0.0)["y"], labels)
    assert (embedder(labels, drop_prob=1.0)["y"] == 5).all()
    again = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert drop_conditioning(captions[:100], 0.5, "", again[0]) == drop_conditioning(
        captions[:100], 0.5, "", again[1]
    )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_conditioning(captions, 1.5, "")


def test_text_dropout_encodes_the_empty_caption(encoder):
    with torch.no_grad():
        dropped = encoder(CAPTIONS[:2], drop_prob=1.0)
        empty = encoder.empty(2)
        kept = encoder(CAPTIONS[:2], drop_prob=0.0)
        plain = encoder(CAPTIONS[:2])
    for key in ("context", "pooled"):
        # empty() encodes one "" and repeats it; other batch sizes, other float kernels.
        torch.testing.assert_close(dropped[key], empty[key], rtol=0, atol=1e-5)
        torch.testing.assert_close(kept[key], plain[key], rtol=0, atol=0)


# --------------------------------------------------------------------------- with the UNet


def tiny_unet(**kwargs) -> UNet:
    torch.manual_seed(0)
    return UNet(
        model_channels=16,
        channel_multipliers=(1, 2),
        blocks_per_level=1,
        attention_levels=(1,),
        num_heads=None,
        head_dim=16,
        linear_projection=True,
        norm_groups=8,
        **kwargs,
    ).eval()


@pytest.mark.parametrize("kind", ["text", "text+pooled", "class-context", "class-y"])
def test_conditioning_dicts_drive_unet_and_cfg(kind, encoder):
    if kind.startswith("text"):
        conditioner = small_clip(pooled=kind == "text+pooled")
        batch = CAPTIONS
        unet = tiny_unet(context_dim=64, pooled_dim=32 if kind == "text+pooled" else None)
    elif kind == "class-context":
        conditioner, batch = ClassEmbedder(10, 24), torch.tensor([1, 2, 3])
        unet = tiny_unet(context_dim=24)
    else:
        conditioner, batch = ClassEmbedder(10, dim=None), torch.tensor([1, 2, 3])
        unet = tiny_unet(context_dim=None, num_classes=11)  # the null class included
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 500.0, 900.0])
    with torch.no_grad():
        cond, uncond = conditioner(batch), conditioner.empty(1)
        guided = cfg(unet, cond, uncond, 3.0)(x, t)
        by_hand = unet(x, t, **cond) * 3.0 - 2.0 * unet(x, t, **conditioner.empty(3))
    torch.testing.assert_close(guided, by_hand, atol=1e-4, rtol=1e-4)
