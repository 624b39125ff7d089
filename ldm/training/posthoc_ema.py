"""Post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of
diffusion models", Sec. 3 and App. C.2): choose the EMA length after training.

A power-function EMA averages the weights seen up to step ``t`` with density
``p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on ``[0, t]``; its update is
``ema <- beta ema + (1 - beta) theta`` with ``beta = (1 - 1/t)^(gamma + 1)``. Its length is
``sigma_rel``, the profile's standard deviation over ``t``:
``sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))``.

Training keeps two such averages (``sigma_rel`` 0.05 and 0.10 by default) and saves both
every ``every_n_steps`` (``PostHocEMA``). Any other profile ``p_r`` at any saved step is then
approximated by the combination of saved profiles closest to it in L2
(``posthoc_coefficients``), and the same combination of the saved weights is its EMA
(``reconstruct``): a sweep over EMA lengths without retraining (``evaluate.py grid.ema=...``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from ldm.io import legacy_names, read_safetensors, save_safetensors
from ldm.training.ema import EMA

log = logging.getLogger(__name__)
SNAPSHOT = "step_{:09d}.safetensors"


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent whose profile has relative std ``sigma_rel``: the largest real root of
    ``gamma^3 + 7 gamma^2 + (16 - s) gamma + 12 - s`` for ``s = sigma_rel^-2``."""
    if not 0 < sigma_rel < 12**-0.5:  # gamma > -1 needs sigma_rel below 1 / sqrt(12)
        raise ValueError(f"sigma_rel must be in (0, {12**-0.5:.4f}), got {sigma_rel}")
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.isreal(roots)].real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(gamma: float, step: int) -> float:
    """The decay of the power-function EMA at (1-based) ``step``: 0 at the first."""
    return (1 - 1 / step) ** (gamma + 1)


def profile_dot(t_a: Any, gamma_a: Any, t_b: Any, gamma_b: Any) -> np.ndarray:
    """The L2 inner product of the profiles ``(t_a, gamma_a)`` and ``(t_b, gamma_b)`` (arrays
    broadcast): ``(g_a + 1)(g_b + 1) min^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1)
    t_b^(g_b + 1))``, written with ratios to stay finite for large exponents."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * ratio**exponent / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def posthoc_coefficients(
    steps: Sequence[int], gammas: Sequence[float], step: int, gamma: float
) -> np.ndarray:
    """Weights ``x`` (N,) of the saved averages (taken at ``steps`` with exponents ``gammas``)
    whose combined profile is closest in L2 to the profile ``(step, gamma)``, normalised to
    sum to 1 (App. C.2, Eq. 41-43)."""
    return _solve(steps, gammas, step, gamma)[0]


def _solve(
    steps: Sequence[int], gammas: Sequence[float], step: int, gamma: float
) -> tuple[np.ndarray, float]:
    """``posthoc_coefficients`` and the fit's relative L2 error ``|sum x_i p_i - p_r| / |p_r|``."""
    t, g = np.asarray(steps, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    a = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_dot(t, g, float(step), float(gamma))
    x = np.linalg.lstsq(a, b, rcond=None)[0]  # A may be near singular: least squares
    x = x / x.sum()
    rr = float(profile_dot(step, gamma, step, gamma))
    return x, math.sqrt(max(x @ a @ x - 2 * x @ b + rr, 0.0) / rr)


def _float_names(network: nn.Module) -> list[str]:
    return [n for n, p in network.named_parameters() if p.dtype.is_floating_point]


def _adapter(name: str) -> str | None:
    """The LoRA adapter a parameter name belongs to (``...lora.<adapter>.down.weight``)."""
    return name.split(".lora.", 1)[1].split(".", 1)[0] if ".lora." in name else None


class PowerEMA(nn.Module):
    """Power-function EMAs of ``network`` for each ``sigma_rel``: ``update(network, step)``
    after optimizer step ``step`` (1-based). Each is an ``EMA`` stepped with the power
    function's decay (frozen parameters copied, not averaged)."""

    def __init__(self, network: nn.Module, sigma_rels: Sequence[float]):
        super().__init__()
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.averages = nn.ModuleList(EMA(network, 0.0, warmup=False) for _ in self.sigma_rels)

    def update(self, network: nn.Module, step: int) -> None:
        for gamma, average in zip(self.gammas, self.averages, strict=True):
            average.update(network, power_beta(gamma, step))

    def snapshot(self) -> dict[str, Tensor]:
        """``{"<i>/<parameter>": tensor}`` for every average ``i``."""
        return {
            f"{i}/{name}": p.detach().cpu().contiguous()
            for i, ema in enumerate(self.averages)
            for name, p in ema.average.named_parameters()
        }


class PostHocEMA(L.Callback):
    """Keeps ``PowerEMA``s of the module's trained networks (``pl_module._trainable()``) and
    saves them to ``<run>/posthoc_ema/step_<step>.safetensors`` every ``every_n_steps``.

    Disk: each snapshot holds ``len(sigma_rels)`` copies of the trained weights (in
    ``dtype``); beyond ``max_snapshots`` the older half is thinned to every second one, so
    the folder never holds more than ``max_snapshots`` files and the newest are densest.
    The averages are part of the callback's state in every checkpoint: a resumed run goes on
    exactly."""

    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        every_n_steps: int = 500,
        max_snapshots: int = 64,
        dtype: str = "float32",  # float32 | bfloat16 | float16: what snapshots are stored in
        dirname: str = "posthoc_ema",
    ):
        if every_n_steps < 1 or max_snapshots < 2:
            raise ValueError("post-hoc EMA needs every_n_steps >= 1 and max_snapshots >= 2")
        self.sigma_rels, self.every_n_steps = [float(s) for s in sigma_rels], every_n_steps
        self.max_snapshots, self.dirname = max_snapshots, dirname
        self.dtype = getattr(torch, dtype)
        self.ema: PowerEMA | None = None
        self._pending: dict[str, Any] | None = None
        self._last_step = 0

    def folder(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.dirname

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Built here, when the module is on its device and a resumed state is loaded."""
        if self.ema is None:
            self.ema = PowerEMA(pl_module._trainable(), self.sigma_rels).to(pl_module.device)
        if self._pending is not None:
            self.ema.load_state_dict(self._pending["averages"])
            self._last_step = self._pending["step"]
            self._pending = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps so far
        if step == self._last_step or self.ema is None:
            return
        self._last_step = step
        self.ema.update(pl_module._trainable(), step)
        if step % self.every_n_steps == 0 and trainer.is_global_zero:
            self._save(trainer, step)

    def _save(self, trainer: L.Trainer, step: int) -> None:
        folder = self.folder(trainer)
        tensors = {k: v.to(self.dtype) for k, v in self.ema.snapshot().items()}
        meta = {
            "step": str(step),
            "sigma_rels": json.dumps(self.sigma_rels),
            "gammas": json.dumps(self.ema.gammas),
        }
        save_safetensors(folder / SNAPSHOT.format(step), tensors, meta)  # atomic
        saved = sorted(folder.glob("step_*.safetensors"))
        if len(saved) > self.max_snapshots:
            older = saved[: len(saved) // 2]
            for path in older[1::2]:
                path.unlink()
            log.info("post-hoc EMA: thinned %d older snapshots in %s", len(older[1::2]), folder)

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        return {"averages": self.ema.state_dict(), "step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending = {**state_dict, "averages": legacy_names(state_dict["averages"])}


def read_snapshots(folder: str | Path) -> list[tuple[int, list[float], dict[str, Tensor]]]:
    """``(step, gammas, tensors)`` of every snapshot in ``folder``, oldest first."""
    paths = sorted(Path(folder).glob("step_*.safetensors"))
    if not paths:
        raise FileNotFoundError(
            f"no post-hoc EMA snapshots in {folder}: train with callbacks.posthoc_ema "
            "(conf/callbacks/with_posthoc_ema.yaml), or give posthoc_ema_dir=<run>/posthoc_ema"
        )
    out = []
    for path in paths:
        tensors, meta = read_safetensors(path)
        out.append((int(meta["step"]), json.loads(meta["gammas"]), legacy_names(tensors)))
    return out


def reconstruct(
    folder: str | Path, sigma_rel: float, step: int | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The EMA of length ``sigma_rel`` at ``step`` (default: the last snapshot's) from the
    snapshots in ``folder``: ``({"<network>.<parameter>": tensor}, about)``, ``about`` naming
    the snapshots used, their weights and the profile fit's relative L2 error."""
    snapshots = read_snapshots(folder)
    step = snapshots[-1][0] if step is None else step
    used = [s for s in snapshots if s[0] <= step]
    if not used:
        raise ValueError(f"no snapshot at or before step {step} in {folder}")
    gamma = sigma_rel_to_gamma(sigma_rel)
    steps = [s for s, gammas, _ in used for _ in gammas]
    gammas = [g for _, gs, _ in used for g in gs]
    weights, error = _solve(steps, gammas, step, gamma)
    merged: dict[str, Tensor] = {}
    offset = 0  # where each snapshot's averages start in ``weights``
    for _, gs, tensors in used:
        for key, value in tensors.items():
            index, name = key.split("/", 1)
            term = value.double() * float(weights[offset + int(index)])
            merged[name] = merged[name] + term if name in merged else term
        offset += len(gs)
    about = {"sigma_rel": sigma_rel, "step": step, "snapshots": len(used), "fit_error": error}
    return {k: v.float() for k, v in merged.items()}, about


def load_posthoc(
    networks: Mapping[str, nn.Module], folder: str | Path, sigma_rel: float, step: int | None = None
) -> dict[str, Any]:
    """Put the reconstructed EMA of ``sigma_rel`` into ``networks`` (``{"denoiser": ...,
    "conditioner": ...}``: the parts the snapshots hold). Returns ``reconstruct``'s ``about``."""
    weights, about = reconstruct(folder, sigma_rel, step)
    for name, network in networks.items():
        prefix = f"{name}."
        part = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        if not part:
            continue
        own = network.state_dict()
        # LoRA adapters loaded after training (``.lora.<name>.``) are not the snapshots' to set.
        adapters = {_adapter(k) for k in part} - {None}
        missing = sorted(
            k for k in set(_float_names(network)) - set(part) if _adapter(k) in adapters | {None}
        )
        if missing:
            raise ValueError(
                f"the snapshots in {folder} lack {len(missing)} weights of {name} (e.g. "
                f"{missing[0]}): they were made for another network"
            )
        own.update({k: v.to(own[k].dtype) for k, v in part.items()})
        network.load_state_dict(own)
    return about
