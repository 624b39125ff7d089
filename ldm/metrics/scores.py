"""FID, KID, IS and CLIP score of generated samples against fixed reference features, as a
torchmetrics ``Metric`` whose states synchronise over processes.

The reference features are a buffer, the same on every rank and never synchronised. The
generated samples' states are order-free sums (FID, CLIP score) and their features,
gathered with each sample's global index and sorted before KID (Binkowski et al. 2018) and
IS (Salimans et al. 2016) draw their seeded subsets and splits: 1 or N processes give the
same numbers for the same samples. FID (Heusel et al. 2017) is computed in float64 as
torchmetrics computes it, ``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 sum sqrt(eig(S1 S2))``, or,
where a set has no more samples than features, from the equal (n, n) symmetric eigenproblem.
Precision and recall are Kynkäänniemi et al. (2019)'s k-nearest-neighbour manifolds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.image.kid import poly_mmd
from torchmetrics.utilities import dim_zero_cat


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """The Fréchet distance of two Gaussians, float64."""
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    root_trace = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root_trace


def frechet_distance_of_features(real: Tensor, fake: Tensor) -> Tensor:
    """``frechet_distance`` of the Gaussians fitted to two feature sets (N, D) and (M, D),
    float64. Where a set has no more samples than features (n <= D: FID at n = 1,000 on
    2048-d Inception features), ``tr sqrt(S1 S2)`` comes from the symmetric (n, n) matrix
    ``C S_other C^T / (n - 1)`` (C that set's centred features; its eigenvalues are the
    nonzero ones of ``S1 S2``) instead of a general (D, D) eigenproblem: the same number,
    fractions of a second instead of seconds."""
    real, fake = real.double(), fake.double()
    small, other = (real, fake) if len(real) <= len(fake) else (fake, real)
    n, dim = small.shape
    if n > dim:
        return frechet_distance(real.mean(0), torch.cov(real.T), fake.mean(0), torch.cov(fake.T))
    centred = small - small.mean(0)
    sigma_other = torch.cov(other.T)
    product = centred @ sigma_other @ centred.T / (n - 1)
    root_trace = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    trace_small = centred.square().sum() / (n - 1)
    mean_gap = (real.mean(0) - fake.mean(0)).square().sum()
    return mean_gap + trace_small + sigma_other.trace() - 2 * root_trace


CMMD_SIGMA, CMMD_SCALE = 10.0, 1000.0  # Jayasumana et al. 2024


def rbf_mmd(
    x: Tensor,
    y: Tensor,
    sigma: float = CMMD_SIGMA,
    scale: float = CMMD_SCALE,
    unbiased: bool = True,
) -> Tensor:
    """``scale * MMD^2`` of two sets (N, D) and (M, D) under the Gaussian RBF kernel
    ``exp(-|a - b|^2 / (2 sigma^2))``, float64: CMMD on L2-normalised CLIP embeddings.
    ``unbiased``: the U-statistic (no self-pairs; ~0 for two samples of one distribution,
    as the paper states); False: the mean over all pairs, as google-research/cmmd's code
    computes it."""
    x, y = x.double(), y.double()

    def mean_kernel(a: Tensor, b: Tensor, same: bool) -> Tensor:
        k = torch.exp(-torch.cdist(a, b).square() / (2 * sigma**2))
        if same and unbiased:
            n = len(a)
            return (k.sum() - k.diagonal().sum()) / (n * (n - 1))
        return k.mean()

    if unbiased and min(len(x), len(y)) < 2:
        raise ValueError("the unbiased MMD needs at least 2 samples per set")
    return scale * (
        mean_kernel(x, x, True) + mean_kernel(y, y, True) - 2 * mean_kernel(x, y, False)
    )


def knn_radii(features: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Each point's distance to its k-th nearest other point of the same set."""
    return torch.cat(
        [
            torch.cdist(features[i : i + chunk], features).kthvalue(k + 1, dim=1).values
            for i in range(0, len(features), chunk)
        ]
    )


def manifold_coverage(queries: Tensor, support: Tensor, radii: Tensor, chunk: int = 1024) -> float:
    """The fraction of ``queries`` inside some support point's k-NN ball."""
    inside = [
        (torch.cdist(queries[i : i + chunk], support) <= radii[None]).any(dim=1)
        for i in range(0, len(queries), chunk)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision (generated samples on the real manifold: fidelity) and recall
    (real samples on the generated manifold: diversity), Kynkäänniemi et al. 2019."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision / recall with k={k} need more than {k} samples per set")
    real, fake = real.double(), fake.double()
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall


def _moments(total: Tensor, outer: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance from sums (torchmetrics' FID formula)."""
    mu = total / n
    return mu, (outer - n * torch.outer(mu, mu)) / (n - 1)


class GenerativeMetrics(Metric):
    """``update(features, index, logits=None, clip_scores=None)`` per batch of generated
    samples, then ``compute()`` -> ``{"fid", "kid_mean", "kid_std", "precision", "recall",
    "is_mean", "is_std", "cmmd", "clip_score", "n_real", "n_fake"}`` (keys whose inputs or
    options were not given are left out)."""

    full_state_update = False

    def __init__(
        self,
        reference: Tensor | None,  # (N, D) reference features, in sample order; None: CLIP only
        *,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,  # capped at the smaller sample count
        is_splits: int = 10,
        seed: int = 0,  # KID subsets and IS splits
        pr_k: int | None = 3,  # precision / recall neighbourhood; None: not computed
        bootstrap: int | None = None,  # resamples of the generated set for FID's 95% interval
        cmmd: bool = False,  # also CMMD (rbf_mmd): for L2-normalised CLIP embeddings
    ):
        super().__init__()
        if reference is not None and (reference.ndim != 2 or len(reference) < 2):
            raise ValueError(
                f"reference features must be (N >= 2, D), got {tuple(reference.shape)}"
            )
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.is_splits, self.seed, self.pr_k = is_splits, seed, pr_k
        self.bootstrap, self.cmmd = bootstrap, cmmd
        self.with_features = reference is not None
        reference = reference if reference is not None else torch.zeros(2, 1)
        self.register_buffer("reference", reference.double(), persistent=False)
        dim = reference.shape[1]
        self.add_state("total", default=torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "outer", default=torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("features", "index", "logits"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state(
            "clip_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "clip_count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(
        self,
        features: Tensor | None,  # (B, D) of generated samples; None without a reference
        index: Tensor,  # (B,) their global indices: the order KID and IS use
        logits: Tensor | None = None,  # (B, classes): for IS
        clip_scores: Tensor | None = None,  # (B,) per-sample CLIP scores
    ) -> None:
        if (features is None) == self.with_features:
            raise ValueError("features go with reference features, and only with them")
        if features is not None:
            features = features.double()
            self.total += features.sum(0)
            self.outer += features.T @ features
            self.count += len(features)
            self.features.append(features)
            self.index.append(index.double())
        if logits is not None:
            self.logits.append(logits.double())
        if clip_scores is not None:
            self.clip_sum += clip_scores.double().sum()
            self.clip_count += clip_scores.numel()

    def _ordered(self, values: Any) -> Tensor:
        return dim_zero_cat(values)[dim_zero_cat(self.index).argsort()]

    def compute(self) -> dict[str, float]:
        if not self.with_features:
            return self._clip()
        real = self.reference
        mu_r, sigma_r = real.mean(0), torch.cov(real.T)
        fake = self._ordered(self.features)
        if min(len(real), len(fake)) <= real.shape[1]:  # the (n, n) route
            fid = frechet_distance_of_features(real, fake)
        else:
            fid = frechet_distance(mu_r, sigma_r, *_moments(self.total, self.outer, self.count))
        out = {"n_real": float(len(real)), "n_fake": float(self.count), "fid": float(fid)}
        generator = torch.Generator().manual_seed(self.seed)
        size = min(self.kid_subset_size, len(real), len(fake))
        if size >= 2:
            # Subsets as large as both sets are both sets reordered, and the unbiased MMD
            # does not depend on order: one value (the draws still advance the generator,
            # which IS's splits use next).
            whole = size == len(real) == len(fake)
            scores = []
            for _ in range(self.kid_subsets):
                r = torch.randperm(len(real), generator=generator)[:size].to(real.device)
                f = torch.randperm(len(fake), generator=generator)[:size].to(fake.device)
                if not whole:
                    scores.append(poly_mmd(real[r], fake[f]))
            kid = poly_mmd(real, fake).reshape(1) if whole else torch.stack(scores)
            out.update(kid_mean=float(kid.mean()), kid_std=float(kid.std(unbiased=False)))
        if self.pr_k is not None and min(len(real), len(fake)) > self.pr_k:
            out["precision"], out["recall"] = precision_recall(real, fake, self.pr_k)
        if self.cmmd and min(len(real), len(fake)) >= 2:
            out["cmmd"] = float(rbf_mmd(real, fake))
        if self.bootstrap:
            out["fid_ci_low"], out["fid_ci_high"] = bootstrap_fid(
                mu_r, sigma_r, fake, self.bootstrap, self.seed
            )
        logits = dim_zero_cat(self.logits) if len(self.logits) else None
        if logits is not None and logits.numel():
            ordered = self._ordered(self.logits)
            out["is_mean"], out["is_std"] = inception_score(ordered, self.is_splits, generator)
        return out | self._clip()

    def _clip(self) -> dict[str, float]:
        if float(self.clip_count) > 0:
            return {"clip_score": float(self.clip_sum / self.clip_count)}
        return {}


def bootstrap_fid(
    mu_real: Tensor, sigma_real: Tensor, fake: Tensor, resamples: int, seed: int = 0
) -> tuple[float, float]:
    """FID's 95% interval over ``resamples`` resamplings (with replacement) of the generated
    features, the reference held fixed: the basic (reverse-percentile) bootstrap interval
    ``(2 F - q97.5, 2 F - q2.5)``, which corrects for resamples scoring worse than the set
    itself (repeated samples shrink the covariance; FID's bias grows as n shrinks)."""
    generator = torch.Generator().manual_seed(seed)
    fake, mu_real, sigma_real = fake.double(), mu_real.double(), sigma_real.double()
    # tr sqrt(S_r S_f) = the nuclear norm of X S_r^(1/2) / sqrt(n - 1), X the centred
    # features: a symmetric eigenproblem per resample, (n, n) or (d, d), whichever is smaller,
    # instead of a general (d, d) one.
    root = _psd_sqrt(sigma_real)
    n, d = fake.shape

    def distance(chosen: Tensor) -> float:
        mean = chosen.mean(0)
        centred = chosen - mean
        projected = centred @ root  # (n, d); its singular values via a Gram matrix
        gram = projected @ projected.T if n <= d else projected.T @ projected
        root_trace = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().sum() / (n - 1) ** 0.5
        trace_fake = centred.square().sum() / (n - 1)
        gap = (mu_real - mean).square().sum()
        return float(gap + sigma_real.trace() + trace_fake - 2 * root_trace)

    estimate = distance(fake)
    draws = (torch.randint(n, (n,), generator=generator) for _ in range(resamples))
    values = [distance(fake[chosen.to(fake.device)]) for chosen in draws]
    quantiles = torch.tensor([0.025, 0.975], dtype=torch.float64)
    low, high = torch.tensor(values, dtype=torch.float64).quantile(quantiles).tolist()
    return 2 * estimate - high, 2 * estimate - low


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """The symmetric square root of a positive semi-definite matrix (negative rounding in
    its eigenvalues clamped to zero)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def wilson_interval(successes: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion (accuracies: exact enough at any n,
    and never outside [0, 1])."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def inception_score(
    logits: Tensor, splits: int = 10, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over ``splits`` random splits: (mean, std)."""
    logits = logits[torch.randperm(len(logits), generator=generator).to(logits.device)]
    scores = []
    for part in logits.chunk(splits):
        log_p = F.log_softmax(part, dim=1)
        log_mean = torch.logsumexp(log_p, dim=0) - torch.log(torch.tensor(float(len(part))))
        scores.append((log_p.exp() * (log_p - log_mean)).sum(1).mean().exp())
    stacked = torch.stack(scores)
    return float(stacked.mean()), float(stacked.std()) if len(scores) > 1 else 0.0
