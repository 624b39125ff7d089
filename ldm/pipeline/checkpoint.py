"""One door for every checkpoint: ``open_checkpoint(path)`` says what a file or folder
holds and builds its networks.

* ours: a ``.ckpt`` from ``train.py`` (its training config, VAE config, EMA weights, LoRA
  adapters and textual-inversion tokens inside), or a ``.safetensors`` carrying that config
  (merges, exports);
* an original Stable Diffusion 1.x / 2.x single file (UNet, VAE and text-tower shapes read
  from the keys);
* a diffusers folder (a pipeline with ``unet/`` or ``transformer/`` and ``vae/``, or one
  model's folder: ``UNet2DConditionModel``, ``DiTTransformer2DModel`` or
  ``SD3Transformer2DModel``);
* any other tensors file (e.g. a bare VAE state dict with ``vae_config`` metadata).

Networks are built from the checkpoint's own config, never by running code it names: only
``ldm.models`` / ``ldm.diffusion`` constructors are called.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from torch import Tensor, nn

from ldm.convert.diffusers_vae import vae_config_from_diffusers, vae_from_diffusers
from ldm.convert.stable_diffusion import (
    DIFFUSERS_FORMS,
    PREFIXES,
    infer_unet_config,
    infer_vae_config,
    split_checkpoint,
    weights_file,
)
from ldm.io import (
    WeightsFileError,
    legacy_names,
    load_into,
    read_json,
    read_pickle,
    read_safetensors,
    read_weights,
    sniff,
)
from ldm.models.textual_inversion import add_tokens
from ldm.models.unet import UNet
from ldm.models.vae import SD_VAE_SCALE, AutoencoderKL
from ldm.nn.lora import inject_from_config

CONFIG_KEY = "ldm_config"  # the resolved training config, as YAML, inside our checkpoints
Format = Literal["ours", "stable-diffusion", "diffusers", "weights"]
# The text tower an SD single file's keys imply -> the conf/model/conditioner preset.
TEXT_ENCODERS = {
    "cond_stage_model.transformer.": "openclip_vit_l",  # SD 1.x: CLIP ViT-L/14 (transformers)
    "cond_stage_model.model.": "openclip_vit_h",  # SD 2.x: OpenCLIP ViT-H/14
}
_BUILDABLE = ("ldm.models.", "ldm.diffusion.")  # constructors a checkpoint's config may name


def legacy_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """A training config of ours with ``model.backbone`` (older ones: ``model.unet``)."""
    model = (config or {}).get("model") or {}
    if "unet" in model and "backbone" not in model:
        model["backbone"] = model.pop("unet")
        task = config.get("task") or {}
        if "unet" in task:
            task["denoiser"] = task.pop("unet")
    return config


def build(spec: Mapping[str, Any]) -> Any:
    """Call the constructor ``spec["_target_"]`` names with the rest as keyword arguments
    (nested specs built first) — only those under ldm.models and ldm.diffusion."""
    target = str(spec["_target_"])
    if not target.startswith(_BUILDABLE):
        raise WeightsFileError(f"a checkpoint's config names {target}, which is not built")
    module, _, name = target.rpartition(".")
    kwargs = {
        k: build(v) if isinstance(v, Mapping) and "_target_" in v else v
        for k, v in spec.items()
        if k != "_target_"
    }
    return getattr(importlib.import_module(module), name)(**kwargs)


@dataclass
class Checkpoint:
    """What a checkpoint holds; its networks are built on request."""

    path: Path
    format: Format
    tensors: dict[str, Tensor] = field(repr=False)  # every tensor of a file (a folder: none)
    config: dict[str, Any] | None = None  # our training config, when it carries one
    vae_config: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # those two as text, and the rest
    _built: dict[bool, dict[str, nn.Module]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------ what it holds

    @property
    def task(self) -> str | None:
        """``vae`` or ``ldm`` for ours, else None."""
        return (self.config or {}).get("task_name")

    @cached_property
    def _split(self) -> dict[str, dict[str, Tensor]]:
        return split_checkpoint(self.tensors).parts if self.format == "stable-diffusion" else {}

    @property
    def has_ema(self) -> bool:
        return any(k.startswith("ema.average.") for k in self.tensors)

    @property
    def adapters(self) -> list[str]:
        """The LoRA adapters inside (fine-tuned with ``lora=``)."""
        lora = (self.config or {}).get("lora")
        return [lora.get("name") or "default"] if lora else []

    @property
    def embeddings(self) -> list[str]:
        """The textual-inversion tokens inside (fine-tuned with ``textual_inversion=``)."""
        return list(((self.config or {}).get("textual_inversion") or {}).get("tokens", []))

    @property
    def text_encoder(self) -> str | None:
        """The conditioner preset (conf/model/conditioner) an SD file's text tower needs."""
        for prefix, preset in TEXT_ENCODERS.items():
            if any(k.startswith(prefix) for k in self.tensors):
                return preset
        return None

    # ------------------------------------------------------------ state dicts

    def weights(self, part: str, ema: bool = True) -> dict[str, Tensor]:
        """The state dict of ``part`` (denoiser, conditioner or vae) in our layout: the EMA
        copy when ``ema`` and it has one; ``{}`` when the checkpoint has no such part."""
        if self.format == "stable-diffusion":
            return self._split.get({"conditioner": "text", "denoiser": "unet"}.get(part, part), {})
        if self.format == "diffusers":
            return self._diffusers(part)[2]
        if part == "vae":
            prefixes = ["vae."] if self.format == "ours" else ["vae.", PREFIXES["vae"], ""]
        else:
            prefixes = [f"ema.average.{part}."] if ema else []
            prefixes.append(f"networks.{part}.")
        for prefix in prefixes:
            found = {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}
            if found and (prefix or "encoder.conv_in.weight" in found):
                return found
        return {}

    def _diffusers(self, part: str) -> tuple[type | None, dict[str, Any], dict[str, Tensor]]:
        """(our class, config, state dict) of the ``denoiser`` (``unet/`` or
        ``transformer/``) or ``vae`` of a diffusers folder; (None, {}, {}) if none."""
        subfolders = ("unet", "transformer") if part == "denoiser" else (part,)
        folder = next((self.path / s for s in subfolders if (self.path / s).is_dir()), self.path)
        if not (folder / "config.json").is_file():
            return None, {}, {}
        config = read_json(folder / "config.json")
        if part == "vae" and "latent_channels" in config:
            tensors = read_weights(weights_file(folder))
            return AutoencoderKL, vae_config_from_diffusers(config), vae_from_diffusers(tensors)
        name = config.get("_class_name")
        if name is None and "cross_attention_dim" in config:
            name = "UNet2DConditionModel"
        if part != "denoiser" or name not in DIFFUSERS_FORMS:
            return None, {}, {}
        form = DIFFUSERS_FORMS[name]
        ours = form.config_from(config)
        return form.network, ours, form.weights_from(read_weights(weights_file(folder)), ours)

    # ------------------------------------------------------------ networks

    def vae(self, strict: bool = True) -> AutoencoderKL | None:
        """The VAE with its latent scale (SD files: SD's), eval mode, frozen; None if none."""
        state = self.weights("vae")
        if not state:
            return None
        if self.format == "diffusers":
            config = self._diffusers("vae")[1]
        else:
            config = self.vae_config or infer_vae_config(state)
            if self.format == "stable-diffusion" and not self.vae_config:
                config |= {"scale_factor": SD_VAE_SCALE}
        vae = AutoencoderKL(**config)
        load_into(vae, state, strict=strict, what=f"VAE of {self.path}")
        return vae.eval().requires_grad_(False)

    def denoiser(self, ema: bool = True) -> nn.Module:
        """The denoiser backbone (ours: with its LoRA adapters), its EMA weights when
        ``ema``."""
        if self.format == "ours":
            return self._ours_networks(ema)["denoiser"]
        if self.format == "diffusers":
            network, config, state = self._diffusers("denoiser")
        else:
            state = self.weights("denoiser")
            config, network = (infer_unet_config(state) if state else {}), UNet
        if not state:
            raise WeightsFileError(f"{self.path} holds no denoiser (UNet or transformer)")
        denoiser = network(**config)
        load_into(denoiser, state, what=f"denoiser of {self.path}")
        return denoiser

    def conditioner(self, ema: bool = True, given: nn.Module | None = None) -> nn.Module | None:
        """Ours: the conditioner it was trained with (tokens and adapters included). Other
        formats: ``given`` (a conditioner preset), filled with the file's text tower when it
        holds one."""
        if self.format == "ours":
            return self._ours_networks(ema).get("conditioner")
        text = self.weights("conditioner")
        if given is not None and text and hasattr(given, "load_text_state"):
            given.load_text_state(text, what=f"text encoder of {self.path}")
        return given

    def _ours_networks(self, ema: bool) -> dict[str, nn.Module]:
        """Our denoiser and conditioner, rebuilt as training left them (adapters, tokens)."""
        if ema in self._built:
            return self._built[ema]
        model = (self.config or {}).get("model") or {}
        if "backbone" not in model:
            raise WeightsFileError(f"{self.path} is a {self.task} checkpoint: it has no denoiser")
        networks = nn.ModuleDict({"denoiser": build(model["backbone"])})
        if model.get("conditioner"):  # built even without weights (class labels on y)
            networks["conditioner"] = build(model["conditioner"])
        if self.config.get("lora"):
            inject_from_config(networks, self.config["lora"])
        tokens = self.embeddings
        if tokens:
            inversion = self.config["textual_inversion"]
            add_tokens(networks["conditioner"], tokens, init_words=list(inversion["init_words"]))
        for name, network in networks.items():
            load_into(network, self.weights(name, ema), what=f"{name} of {self.path}")
        self._built[ema] = dict(networks)
        return self._built[ema]

    def schedule(self) -> Any:
        """Ours: the noise schedule it was trained with; None for other formats."""
        spec = ((self.config or {}).get("diffusion") or {}).get("schedule")
        return build(spec) if spec else None

    @property
    def prediction(self) -> str | None:
        return ((self.config or {}).get("diffusion") or {}).get("prediction")

    @property
    def image_size(self) -> int | list[int] | None:
        return ((self.config or {}).get("task") or {}).get("image_size")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """What ``path`` holds: ours, an SD single file, a diffusers folder or bare weights.
    A bad file is one ``WeightsFileError`` naming it."""
    path = Path(path)
    kind = sniff(path)
    if kind == "diffusers":
        return Checkpoint(path, "diffusers", {})
    if kind == "safetensors":
        tensors, metadata = read_safetensors(path)
        config = yaml.safe_load(metadata[CONFIG_KEY]) if CONFIG_KEY in metadata else None
        tensors = legacy_names(tensors)
        vae_config = json.loads(metadata["vae_config"]) if "vae_config" in metadata else None
    else:
        state = read_pickle(path)
        if not isinstance(state, Mapping):
            raise WeightsFileError(f"{path} holds a {type(state).__name__}, not a checkpoint")
        raw = state.get("state_dict", state)
        tensors = legacy_names({k: v for k, v in raw.items() if isinstance(v, Tensor)})
        config = yaml.safe_load(state[CONFIG_KEY]) if state.get(CONFIG_KEY) else None
        vae_config = state.get("vae_config")
        metadata = {CONFIG_KEY: state[CONFIG_KEY]} if config is not None else {}
        if vae_config is not None:
            metadata["vae_config"] = json.dumps(vae_config)
    config = legacy_config(config)
    ours = config is not None and any(k.startswith(("networks.", "vae.")) for k in tensors)
    if ours:
        form: Format = "ours"
    elif any(k.startswith(PREFIXES["unet"]) for k in tensors):
        form = "stable-diffusion"
    else:
        form = "weights"
    return Checkpoint(path, form, tensors, config, vae_config, metadata)
