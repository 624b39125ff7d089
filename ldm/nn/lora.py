"""Low-rank adapters (Hu et al. 2021) for any module's Linear and Conv2d layers.

``inject_lora(model, "style", targets="attn", rank=8)`` turns every matching ``nn.Linear``
(and, with ``conv_rank``, ``nn.Conv2d``) into a LoRA layer: the same module, the same base
``weight`` / ``bias`` parameters under the same names (base checkpoints still load), plus a
``lora`` dict of named adapters. An adapter is ``up(down(dropout(x)))`` scaled by
``alpha / rank`` and by its weight; ``up`` starts at zero, so a fresh adapter changes
nothing. Several adapters can be active at once, each with its own weight; ``merge``
folds active adapters into the base weights (for speed) and ``unmerge`` takes them out.
Adapters save alone (``ldm.convert.lora.save_adapter``): safetensors with their settings
in the metadata.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

# Name patterns (fnmatch, on a module's dotted path) of the layer presets, for every
# denoiser backbone (UNet, DiT, MMDiT: its text stream's projections too) and the text
# encoders: attention projections, plus the feed-forward, or every Linear.
_ATTN = ("*.to_q", "*.to_k", "*.to_v", "*.to_out.0", "*.to_qkv", "*.attn.out_proj")
_ATTN += ("*.add_q_proj", "*.add_k_proj", "*.add_v_proj", "*.to_add_out")
_FF = ("*.ff.net.0.proj", "*.ff.net.2", "*.ff_context.net.0.proj", "*.ff_context.net.2")
PRESETS = {
    "attn": _ATTN,
    "attn+ff": (*_ATTN, *_FF, "*.mlp.c_fc", "*.mlp.c_proj"),
    "all-linear": ("*",),
}


@dataclass(frozen=True)
class LoRASettings:
    rank: int = 4
    alpha: float = 4.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, while training
    targets: str | tuple[str, ...] = "attn"  # a preset or name patterns
    conv_rank: int | None = None  # also adapt Conv2d layers at this rank (None: no)
    conv_alpha: float | None = None  # default: conv_rank

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class _Adapter(nn.Module):
    """``down`` then ``up``; ``up`` is zero at first."""

    def __init__(self, down: nn.Module, up: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.down, self.up = down, up
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha = rank, alpha
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)  # as nn.Linear initialises
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(self.dropout(x))) * (self.alpha / self.rank)

    def delta_weight(self) -> Tensor:
        """The update of the base weight, ``alpha / rank * up @ down``, float32."""
        return low_rank_delta(self.down.weight, self.up.weight, self.alpha / self.rank)


def low_rank_delta(down: Tensor, up: Tensor, scale: float) -> Tensor:
    """``scale * up @ down`` in float32, shaped as the adapted layer's weight."""
    up, down = up.float(), down.float()
    if down.ndim == 4:  # conv: up is 1x1 (out, r, 1, 1), down (r, in, kh, kw)
        return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * scale
    return (up @ down) * scale  # (out, r) @ (r, in)


def layer_alpha(tensors: Mapping[str, Tensor], path: str, settings: Mapping[str, Any]) -> float:
    """An adapter layer's alpha: its own (kohya files store one per layer), else the
    settings' ``alpha`` (``conv_alpha`` for a conv), else its rank."""
    down = tensors[f"{path}.lora_down.weight"]
    if f"{path}.alpha" in tensors:
        return float(tensors[f"{path}.alpha"])
    return float(settings.get("conv_alpha" if down.ndim == 4 else "alpha") or down.shape[0])


class _LoRALayer:
    """What LoRALinear and LoRAConv2d share: named adapters, their weights, merging."""

    lora: nn.ModuleDict
    weight: nn.Parameter

    def _init_lora(self) -> None:
        self.lora = nn.ModuleDict()
        self.lora_weights: dict[str, float] = {}  # adapter -> weight (0: off)
        self.lora_merged: dict[str, float] = {}  # adapter -> weight folded into the base

    def _lora_delta(self, x: Tensor) -> Tensor | None:
        out = None
        for name, adapter in self.lora.items():
            weight = self.lora_weights.get(name, 0.0)
            if weight == 0.0 or name in self.lora_merged:
                continue
            delta = adapter(x.to(adapter.down.weight.dtype)) * weight
            out = delta if out is None else out + delta
        return out

    def active_delta_weight(self) -> Tensor | None:
        """The weight update of the active, unmerged adapters (float32), or None."""
        out = None
        for name, adapter in self.lora.items():
            weight = self.lora_weights.get(name, 0.0)
            if weight == 0.0 or name in self.lora_merged:
                continue
            delta = adapter.delta_weight() * weight
            out = delta if out is None else out + delta
        return out

    @torch.no_grad()
    def merge(self, names: Iterable[str] | None = None) -> None:
        for name in list(self.lora) if names is None else names:
            weight = self.lora_weights.get(name, 0.0)
            if name in self.lora_merged or weight == 0.0:
                continue
            delta = self.lora[name].delta_weight() * weight
            self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            self.lora_merged[name] = weight

    @torch.no_grad()
    def unmerge(self, names: Iterable[str] | None = None) -> None:
        for name in list(self.lora_merged) if names is None else names:
            if name not in self.lora_merged:
                continue
            delta = self.lora[name].delta_weight() * self.lora_merged.pop(name)
            self.weight.copy_((self.weight.float() - delta).to(self.weight.dtype))


class LoRALinear(nn.Linear, _LoRALayer):
    """``nn.Linear`` (same ``weight`` / ``bias``) plus named low-rank adapters."""

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        delta = self._lora_delta(x)
        return out if delta is None else out + delta.to(out.dtype)

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float) -> None:
        down = nn.Linear(self.in_features, rank, bias=False, device=self.weight.device)
        up = nn.Linear(rank, self.out_features, bias=False, device=self.weight.device)
        self.lora[name] = _Adapter(down, up, rank, alpha, dropout).train(self.training)


class LoRAConv2d(nn.Conv2d, _LoRALayer):
    """``nn.Conv2d`` (same ``weight`` / ``bias``) plus named low-rank adapters: a conv with
    the base's kernel, stride and padding down to ``rank`` channels, then a 1x1 conv up."""

    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        delta = self._lora_delta(x)
        return out if delta is None else out + delta.to(out.dtype)

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float) -> None:
        if self.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported")
        down = nn.Conv2d(
            self.in_channels,
            rank,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=False,
            device=self.weight.device,
        )
        up = nn.Conv2d(rank, self.out_channels, 1, bias=False, device=self.weight.device)
        self.lora[name] = _Adapter(down, up, rank, alpha, dropout).train(self.training)


class LoRAMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose ``out_proj`` carries adapters. Its forward reads
    ``out_proj.weight`` directly and never calls ``out_proj``, so the adapters' update is
    added to that weight for the call (gradients reach the adapters; their dropout, which
    acts on a layer input this path never sees, does not apply)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out_proj = self.out_proj
        delta = out_proj.active_delta_weight() if isinstance(out_proj, _LoRALayer) else None
        if delta is None:
            return super().forward(*args, **kwargs)
        weight = out_proj.weight + delta.to(out_proj.weight.dtype)
        # The weight swapped in for this call only (what torch.func.functional_call does,
        # without calling the module, and its hooks, a second time).
        with _reparametrize_module(self, {"out_proj.weight": weight}):
            return super().forward(*args, **kwargs)


def _adapt_attention(model: nn.Module) -> None:
    """Make every ``nn.MultiheadAttention`` whose ``out_proj`` has adapters use them."""
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and isinstance(module.out_proj, _LoRALayer):
            module.__class__ = LoRAMultiheadAttention  # same object, same parameters


def _as_lora(module: nn.Module) -> nn.Module:
    """The module as a LoRA layer, keeping its parameter objects and names."""
    if isinstance(module, _LoRALayer):
        return module
    cls = LoRALinear if isinstance(module, nn.Linear) else LoRAConv2d
    module.__class__ = cls  # same object: parents, hooks, optimizers keep pointing at it
    module._init_lora()
    return module


def _patterns(targets: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        if targets not in PRESETS:
            raise ValueError(
                f"unknown LoRA preset {targets!r}; use one of {sorted(PRESETS)} or patterns"
            )
        return PRESETS[targets]
    return tuple(targets)


def adapter_settings(model: nn.Module) -> dict[str, LoRASettings]:
    """The settings each adapter was made with, kept on the model (a plain attribute)."""
    if not hasattr(model, "lora_settings"):
        model.lora_settings = {}
    return model.lora_settings


def lora_layers(model: nn.Module) -> dict[str, _LoRALayer]:
    """Every LoRA layer of ``model`` by its dotted path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _LoRALayer)}


def inject_from_config(networks: nn.ModuleDict, cfg: Mapping[str, Any]) -> dict[str, list[str]]:
    """Inject the adapter a ``lora`` config entry describes (conf/lora/: name, rank, alpha,
    dropout, targets, conv_rank, conv_alpha; ``text_encoder`` adds one to
    ``networks["conditioner"]`` at ``text_targets``) into ``networks["denoiser"]``; returns the
    adapted layers per network. Settings it does not give keep LoRASettings' defaults."""
    name = cfg.get("name") or "default"
    given = {k: cfg[k] for k in LoRASettings.__dataclass_fields__ if cfg.get(k) is not None}
    if isinstance(given.get("targets"), Sequence) and not isinstance(given["targets"], str):
        given["targets"] = tuple(str(t) for t in given["targets"])  # not a Hydra ListConfig
    given.setdefault("alpha", given.get("rank", LoRASettings.rank))  # alpha null: = rank
    settings = LoRASettings(**given)
    layers = {"denoiser": inject_lora(networks["denoiser"], name, settings)}
    if cfg.get("text_encoder"):
        if "conditioner" not in networks:
            raise ValueError("lora.text_encoder=true, but the model has no conditioner")
        targets = cfg.get("text_targets") or LoRASettings.targets
        text = replace(settings, targets=targets, conv_rank=None)
        layers["conditioner"] = inject_lora(networks["conditioner"], name, text)
    networks.lora_settings = {name: settings}
    return layers


def inject_lora(
    model: nn.Module, name: str = "default", settings: LoRASettings | None = None, **kwargs: Any
) -> list[str]:
    """Add adapter ``name`` to every Linear (and, with ``conv_rank``, Conv2d) layer whose
    dotted path matches the settings' targets; returns those paths. The adapter starts
    enabled with weight 1.0 and changes no output until trained."""
    settings = settings or LoRASettings(**kwargs)
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"adapter names are letters, digits, _ and -; got {name!r}")
    patterns = _patterns(settings.targets)
    chosen = []
    for path, module in list(model.named_modules()):
        if ".lora." in f".{path}.":
            continue
        linear = isinstance(module, nn.Linear)
        conv = isinstance(module, nn.Conv2d) and settings.conv_rank is not None
        if not (linear or conv) or not any(fnmatch.fnmatchcase(path, p) for p in patterns):
            continue
        layer = _as_lora(module)
        if name in layer.lora:
            raise ValueError(f"{path} already has an adapter named {name!r}")
        if linear:
            layer.add_adapter(name, settings.rank, settings.alpha, settings.dropout)
        else:
            layer.add_adapter(
                name,
                settings.conv_rank,
                settings.conv_alpha or settings.conv_rank,
                settings.dropout,
            )
        layer.lora_weights[name] = 1.0
        chosen.append(path)
    if not chosen:
        raise ValueError(f"no layer of {type(model).__name__} matches the LoRA targets {patterns}")
    _adapt_attention(model)
    adapter_settings(model)[name] = settings
    return chosen


def set_adapter_weights(model: nn.Module, weights: Mapping[str, float]) -> None:
    """Each named adapter's weight (0: off); adapters not named keep theirs. Merged
    adapters must be unmerged first."""
    for path, layer in lora_layers(model).items():
        for name, weight in weights.items():
            if name in layer.lora_merged and weight != layer.lora_merged[name]:
                raise ValueError(f"adapter {name!r} is merged into {path}: unmerge it first")
            if name in layer.lora:
                layer.lora_weights[name] = float(weight)


def disable_adapters(model: nn.Module) -> dict[str, float]:
    """Turn every adapter off (the base model's outputs, exactly); returns the weights
    they had, for ``set_adapter_weights`` to restore."""
    before = adapter_weights(model)
    set_adapter_weights(model, dict.fromkeys(before, 0.0))
    return before


def adapter_weights(model: nn.Module) -> dict[str, float]:
    weights: dict[str, float] = {}
    for layer in lora_layers(model).values():
        weights.update(layer.lora_weights)
    return weights


def merge_adapters(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Fold the active adapters (or ``names``) into the base weights, at their weights."""
    for layer in lora_layers(model).values():
        layer.merge(names)


def unmerge_adapters(model: nn.Module, names: Iterable[str] | None = None) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge(names)


def adapter_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The parameters of adapter ``name`` (or of every adapter)."""
    return [
        p
        for layer in lora_layers(model).values()
        for key, adapter in layer.lora.items()
        if name is None or key == name
        for p in adapter.parameters()
    ]


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """Adapter ``name`` alone: ``{path}.lora_down.weight`` / ``{path}.lora_up.weight``."""
    out = {}
    for path, layer in lora_layers(model).items():
        if name in layer.lora:
            out[f"{path}.lora_down.weight"] = layer.lora[name].down.weight.detach()
            out[f"{path}.lora_up.weight"] = layer.lora[name].up.weight.detach()
    if not out:
        raise ValueError(f"the model has no adapter named {name!r}")
    return out


def load_adapter(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    name: str,
    settings: Mapping[str, Any] | None = None,
    weight: float = 1.0,
) -> list[str]:
    """Inject adapter ``name`` shaped like our-format ``tensors`` (``adapter_state_dict``'s
    layout; a file's: ``ldm.convert.lora.read_adapter``) and load them, with ``settings``
    (rank / alpha defaults, dropout); every tensor must find its layer."""
    layers = {k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}
    modules = dict(model.named_modules())
    missing = sorted(p for p in layers if p not in modules)
    if missing:
        raise ValueError(f"adapter layers not in the model: {', '.join(missing[:20])}")
    for path in sorted(layers):  # everything checked before anything changes
        _check_adapter_layer(modules[path], path, name, tensors)
    stored = dict(settings or {})
    for path in sorted(layers):
        down, up = tensors[f"{path}.lora_down.weight"], tensors[f"{path}.lora_up.weight"]
        rank, alpha = down.shape[0], layer_alpha(tensors, path, stored)
        layer = _as_lora(modules[path])
        layer.add_adapter(name, rank, alpha, float(stored.get("dropout", 0.0)))
        layer.lora[name].down.weight.data.copy_(down)
        layer.lora[name].up.weight.data.copy_(up)
        layer.lora_weights[name] = float(weight)
    _adapt_attention(model)
    if stored:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
        adapter_settings(model)[name] = LoRASettings(**fields)
    return sorted(layers)


def _check_adapter_layer(
    module: nn.Module, path: str, name: str, tensors: Mapping[str, Tensor]
) -> None:
    """A ValueError unless ``module`` can take adapter ``name`` shaped like ``tensors``."""
    if not isinstance(module, nn.Linear | nn.Conv2d):
        raise ValueError(f"{path} is a {type(module).__name__}: adapters go on Linear / Conv2d")
    if isinstance(module, _LoRALayer) and name in module.lora:
        raise ValueError(f"{path} already has an adapter named {name!r}")
    down = tensors.get(f"{path}.lora_down.weight")
    up = tensors.get(f"{path}.lora_up.weight")
    if down is None or up is None:
        raise ValueError(f"{path}: the adapter needs both lora_down and lora_up weights")
    rank = down.shape[0]
    if isinstance(module, nn.Linear):
        want = ((rank, module.in_features), (module.out_features, rank))
    else:
        kernel = tuple(module.kernel_size)
        want = ((rank, module.in_channels, *kernel), (module.out_channels, rank, 1, 1))
    if (tuple(down.shape), tuple(up.shape)) != want:
        raise ValueError(
            f"{path}: adapter weights {tuple(down.shape)} / {tuple(up.shape)} do not fit the "
            f"layer (expected {want[0]} / {want[1]}): an adapter of another model?"
        )


def remove_adapter(model: nn.Module, name: str) -> None:
    """Drop adapter ``name`` (unmerging it first)."""
    for layer in lora_layers(model).values():
        if name in layer.lora:
            layer.unmerge([name])
            del layer.lora[name]
            layer.lora_weights.pop(name, None)
    adapter_settings(model).pop(name, None)
