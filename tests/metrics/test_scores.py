"""FID against the paper's formula, KID / IS independent of sample order, the extractors,
and reference statistics: cached with provenance, reused, invalidated, refused."""

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from ldm.data.builtin import ShapesDataset
from ldm.metrics.extractors import INCEPTION_FILE, fid_helper_file, make_extractor, to_uint8
from ldm.metrics.inception import FoldedInceptionV3
from ldm.metrics.reference import content_digest, provenance, read_reference, reference_features
from ldm.metrics.scores import GenerativeMetrics


def reference_fid(x: torch.Tensor, y: torch.Tensor) -> float:
    """Heusel et al. 2017 in float64 with scipy's sqrtm."""
    x, y = x.double().numpy(), y.double().numpy()
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(
        ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    )


def scores(real, fake, order=None, chunks=1, logits=None):
    metrics = GenerativeMetrics(real, kid_subsets=20, kid_subset_size=100, is_splits=4, seed=3)
    index = torch.arange(len(fake)) if order is None else order
    for part in torch.arange(len(fake)).chunk(chunks):
        chosen = index[part]
        metrics.update(fake[chosen], chosen, None if logits is None else logits[chosen])
    return metrics.compute()


def test_fid_matches_the_formula_and_identical_sets_give_zero():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(600, 32, generator=g)
    fake = (
        torch.randn(500, 32, generator=g) @ (torch.eye(32) + 0.1 * torch.randn(32, 32, generator=g))
        + 0.2
    )
    ours = scores(real, fake)["fid"]
    assert ours == pytest.approx(reference_fid(real, fake), rel=1e-4)
    assert abs(scores(real, real)["fid"]) < 1e-6


@pytest.mark.parametrize("n_real,n_fake", [(300, 40), (40, 300), (40, 25)])
def test_fid_from_fewer_samples_than_features_is_the_same_number(n_real, n_fake):
    """The (n, n) route where a set has fewer samples than its 64 features."""
    from ldm.metrics.scores import frechet_distance

    g = torch.Generator().manual_seed(4)
    mix = torch.eye(64) + 0.3 * torch.randn(64, 64, generator=g)
    real = torch.randn(n_real, 64, generator=g, dtype=torch.float64)
    fake = torch.randn(n_fake, 64, generator=g, dtype=torch.float64) @ mix.double() + 0.1
    ours = scores(real, fake)["fid"]
    general = frechet_distance(real.mean(0), torch.cov(real.T), fake.mean(0), torch.cov(fake.T))
    assert ours == pytest.approx(float(general), rel=1e-7)
    assert ours == pytest.approx(reference_fid(real, fake), rel=1e-6)


def test_kid_and_is_do_not_depend_on_order_or_batching():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(300, 16, generator=g), torch.randn(200, 16, generator=g) + 0.5
    logits = torch.randn(200, 10, generator=g) * 3
    plain = scores(real, fake, logits=logits)
    shuffled = scores(real, fake, order=torch.randperm(200, generator=g), chunks=7, logits=logits)
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall", "is_mean", "is_std"):
        assert shuffled[key] == pytest.approx(plain[key], rel=1e-9), key
    assert plain["kid_mean"] > 10 * plain["kid_std"] / 20**0.5  # shifted sets: clearly positive


def test_kid_of_whole_sets_is_computed_once_and_is_is_unchanged():
    """Subsets as large as both sets: every subset's unbiased MMD is the same number."""
    from torchmetrics.image.kid import poly_mmd

    from ldm.metrics.scores import inception_score

    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(120, 16, generator=g), torch.randn(120, 16, generator=g) + 0.3
    logits = torch.randn(120, 10, generator=g) * 3
    metrics = GenerativeMetrics(real, kid_subsets=5, kid_subset_size=120, is_splits=4, seed=3)
    metrics.update(fake, torch.arange(120), logits)
    out = metrics.compute()
    draws = torch.Generator().manual_seed(3)
    subsets = []
    for _ in range(5):  # the loop it replaces: each subset a permutation of the whole set
        r, f = (torch.randperm(120, generator=draws) for _ in range(2))
        subsets.append(float(poly_mmd(real[r], fake[f])))
    assert out["kid_mean"] == pytest.approx(np.mean(subsets), rel=1e-6)
    assert max(subsets) - min(subsets) < 1e-6 * abs(out["kid_mean"]) and out["kid_std"] == 0
    # IS's splits come from the generator after KID's draws, as before
    assert out["is_mean"] == pytest.approx(inception_score(logits, 4, draws)[0], rel=1e-6)
    fresh = inception_score(logits, 4, torch.Generator().manual_seed(3))[0]
    assert abs(fresh - out["is_mean"]) > 1e-4


def brute_precision_recall(real, fake, k):
    """Kynkäänniemi et al. 2019 written out with numpy, one point at a time."""
    real, fake = real.double().numpy(), fake.double().numpy()

    def radii(x):
        return np.array([np.sort(np.linalg.norm(x - p, axis=1))[k] for p in x])

    def covered(queries, support, r):
        return np.mean([np.any(np.linalg.norm(support - q, axis=1) <= r) for q in queries])

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_and_recall():
    g = torch.Generator().manual_seed(4)
    real = torch.randn(150, 8, generator=g)
    fake = torch.randn(120, 8, generator=g) + 1.0  # shifted: neither set covers the other
    got = scores(real, fake, chunks=5)
    want = brute_precision_recall(real, fake, 3)
    assert (got["precision"], got["recall"]) == pytest.approx(want, abs=1e-12)
    assert 0.1 < got["precision"] < 0.9 and 0.1 < got["recall"] < 0.9
    same = scores(real, real)
    assert same["precision"] == same["recall"] == 1.0
    collapsed = scores(real, real[:10].repeat(5, 1))  # every sample a copy of 10 real ones
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.3
    far = scores(real, torch.randn(100, 8, generator=g) + 50)
    assert far["precision"] == far["recall"] == 0.0


def test_reset_keeps_the_reference():
    real = torch.randn(100, 8)
    metrics = GenerativeMetrics(real, kid_subset_size=50)
    metrics.update(real + 3, torch.arange(100))
    far = metrics.compute()["fid"]
    metrics.reset()
    metrics.update(real, torch.arange(100))
    assert far > 10 and abs(metrics.compute()["fid"]) < 1e-6


def test_extractors_never_touch_the_network(no_network, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"{INCEPTION_FILE}.*{tmp_path}/hub/checkpoints"):
        make_extractor("inception")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        make_extractor("vgg")
    tiny = make_extractor("tiny")
    images = to_uint8(torch.rand(3, 3, 32, 32) * 2 - 1)
    features, logits = tiny.features_and_logits(images)
    assert features.shape == (3, 64) and logits.shape == (3, 10)
    with pytest.raises(ValueError, match="uint8"):
        tiny.features(images.float())
    bundled = make_extractor("torchscript:fid-helper")  # the offline InceptionV3
    assert bundled.num_features == 2048 and bundled.features(images[:1]).shape == (1, 2048)
    assert len(bundled.provenance["weights_sha256"]) == 64
    # it runs an eager copy (batch norm folded, channels-last, 8 images at a time on a
    # CPU): the same features as the TorchScript itself, in one plain batch of 10
    assert isinstance(bundled.net, FoldedInceptionV3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        script = torch.jit.load(str(fid_helper_file())).eval()
    ten = to_uint8(torch.rand(10, 3, 32, 32) * 2 - 1)
    x = torch.nn.functional.interpolate(
        ten.float(), size=(299, 299), mode="bilinear", antialias=True
    )
    with torch.no_grad():
        plain = script(x / 128.0 - 1.0)
    torch.testing.assert_close(bundled.features(ten), plain, atol=1e-4, rtol=1e-4)


def test_a_torchscript_network_of_another_architecture_runs_as_given(tmp_path):
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, 8), torch.nn.Flatten()))
    net.save(str(tmp_path / "net.pt"))
    extractor = make_extractor(f"torchscript:{tmp_path / 'net.pt'}")
    assert isinstance(extractor.net, torch.jit.ScriptModule)
    assert extractor.num_features == 4 * 37 * 37
    images = to_uint8(torch.rand(9, 3, 32, 32) * 2 - 1)  # two chunks on a CPU
    assert extractor.features(images).shape == (9, 4 * 37 * 37)


def test_to_uint8_rounds_once():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5])
    assert to_uint8(x.view(1, 1, 1, -1)).flatten().tolist() == [0, 0, 128, 191, 255, 255]


class _Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0
        self.num_features, self.provenance = inner.num_features, inner.provenance

    def features(self, images):
        self.calls += 1
        return self.inner.features(images)


def test_reference_cache_is_reused_and_invalidated(tmp_path):
    data = ShapesDataset("val", size=16, num_samples=[8, 40, 8])
    config = {"target": "shapes", "size": 16}
    common = dict(dataset_config=config, split="val", count=40, cache_dir=tmp_path, batch_size=16)
    extractor = _Counting(make_extractor("tiny"))
    first, record, extracted = reference_features(data, extractor, **common)
    assert extracted and extractor.calls == 3 and first.shape == (40, 64)
    again, _, extracted = reference_features(data, extractor, **common)
    assert not extracted and extractor.calls == 3 and torch.equal(again, first)
    other = _Counting(make_extractor("tiny:64:1"))  # another extractor: computed anew
    assert reference_features(data, other, **common)[2] and other.calls == 3
    resized = ShapesDataset("val", size=20, num_samples=[8, 40, 8])  # other preprocessing
    assert reference_features(
        resized, extractor, **common | {"dataset_config": config | {"size": 20}}
    )[2]
    assert len(list(tmp_path.glob("reference-*.safetensors"))) == 3
    # A given reference file whose provenance differs is refused, naming the fields.
    path = next(
        p
        for p in tmp_path.iterdir()
        if read_reference(p)[1]["extractor"] == "tiny:64:0"
        and read_reference(p)[1]["dataset"]["size"] == 16
    )
    expected = provenance(config, "test", 40, extractor.inner, content_digest(data, 40))
    with pytest.raises(ValueError, match=r"refusing to compare: .*split: 'val' vs 'test'"):
        read_reference(path, expected)
    assert torch.equal(read_reference(path, record)[0], first)


def _numpy_rbf_mmd(x, y, sigma=10.0, scale=1000.0, unbiased=True):
    """MMD^2 with the Gaussian kernel, written out pair by pair in numpy."""
    x, y = x.double().numpy(), y.double().numpy()

    def k(a, b):
        return np.exp(-((a - b) ** 2).sum() / (2 * sigma**2))

    def within(a):
        pairs = [
            k(a[i], a[j]) for i in range(len(a)) for j in range(len(a)) if i != j or not unbiased
        ]
        return sum(pairs) / len(pairs)

    across = np.mean([k(a, b) for a in x for b in y])
    return scale * (within(x) + within(y) - 2 * across)


@pytest.mark.parametrize("unbiased", [True, False])
def test_cmmd_kernel_is_the_formula(unbiased):
    from ldm.metrics.scores import rbf_mmd

    generator = torch.Generator().manual_seed(4)
    x = torch.nn.functional.normalize(torch.randn(30, 16, generator=generator), dim=1)
    y = torch.nn.functional.normalize(torch.randn(25, 16, generator=generator) + 0.3, dim=1)
    got = float(rbf_mmd(x, y, unbiased=unbiased))
    assert got == pytest.approx(_numpy_rbf_mmd(x, y, unbiased=unbiased), abs=1e-6)
    assert got > 0
    # Two samples of one distribution: the unbiased estimate is ~0 (either sign); the
    # biased one is positive, of order scale / n.
    a, b = torch.randn(2, 400, 16, generator=generator).unbind()
    a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    assert abs(float(rbf_mmd(a, b))) < 0.05 and float(rbf_mmd(a, a, unbiased=False)) == 0.0


def test_bootstrap_interval_holds_fid_and_shrinks_with_n():
    from ldm.metrics.scores import bootstrap_fid

    generator = torch.Generator().manual_seed(5)
    real = torch.randn(400, 4, generator=generator, dtype=torch.float64).float().double()
    mu, sigma = real.mean(0), torch.cov(real.T)

    def interval(n):
        fake = torch.randn(n, 4, generator=generator, dtype=torch.float64) * 1.2 + 0.3
        metrics = GenerativeMetrics(real.float(), kid_subset_size=50, pr_k=None, bootstrap=200)
        metrics.update(fake.float(), torch.arange(n))
        out = metrics.compute()
        assert out["fid_ci_low"] < out["fid"] < out["fid_ci_high"]
        want = bootstrap_fid(mu, sigma, fake.float(), 200)
        assert (out["fid_ci_low"], out["fid_ci_high"]) == pytest.approx(want, rel=1e-6)
        return out["fid_ci_high"] - out["fid_ci_low"]

    assert interval(800) < interval(100)


@pytest.mark.parametrize("n", [30, 200])  # fewer samples than features (rank-deficient), more
def test_bootstrap_resamples_score_exactly_their_frechet_distance(n):
    """The bootstrap's SVD shortcut for tr sqrt(S_r S_f) against frechet_distance."""
    from ldm.metrics.scores import bootstrap_fid, frechet_distance

    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 64, generator=g, dtype=torch.float64) @ torch.randn(
        64, 64, generator=g, dtype=torch.float64
    )
    mu, sigma = real.mean(0), torch.cov(real.T)
    fake = (torch.randn(n, 64, generator=g, dtype=torch.float64) * 1.3 + 0.2) @ torch.randn(
        64, 64, generator=g, dtype=torch.float64
    )
    draws = torch.Generator().manual_seed(7)
    values = []
    for _ in range(20):  # the resamples bootstrap_fid(seed=7) draws
        chosen = fake[torch.randint(n, (n,), generator=draws)]
        values.append(float(frechet_distance(mu, sigma, chosen.mean(0), torch.cov(chosen.T))))
    estimate = float(frechet_distance(mu, sigma, fake.mean(0), torch.cov(fake.T)))
    quantiles = torch.tensor([0.025, 0.975], dtype=torch.float64)
    low, high = torch.tensor(values, dtype=torch.float64).quantile(quantiles)
    want = (2 * estimate - float(high), 2 * estimate - float(low))
    # (the general eigenproblem of frechet_distance is itself good to ~1e-7 here)
    assert bootstrap_fid(mu, sigma, fake, 20, seed=7) == pytest.approx(want, rel=1e-6)


def test_wilson_interval():
    from ldm.metrics.scores import wilson_interval

    low, high = wilson_interval(95, 100)
    assert low == pytest.approx(0.8882, abs=1e-4) and high == pytest.approx(0.9785, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
