import numpy as np
import torch

from d3fast.config import resolve_config
from d3fast.data.loader import load_dataset
from d3fast.data.prepare import prepare


def test_normalisation_batches_and_per_class_sampling():
    prepare(resolve_config("digits"), progress=False)
    ds = load_dataset("digits", "train")
    assert ds.images.dtype == torch.uint8  # kept as uint8 on the device
    x = ds.normalize(ds.images)
    # normalised by the train split's own float64 statistics: the float32 mean of 1.5M values is
    # ~1e-7 off in any summation order (ATen sums in cascades); 1e-4 and 1e-3 are 1,000x that
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([y for _, y in ds.batches(100, shuffle=True, generator=g)])
    assert len(seen) == len(ds) and torch.equal(seen.sort().values, ds.labels.sort().values)
    assert sum(1 for _ in ds.batches(100, shuffle=False, drop_last=True)) == len(ds) // 100
    per = ds.sample_per_class(5, torch.Generator().manual_seed(1))
    assert per.shape == (10, 5, 1, 32, 32)
    # each row really is class c: find the sampled images among class c's images
    for c in range(10):
        pool = ds.normalize(ds.images[ds.labels == c]).flatten(1)
        for img in per[c].flatten(1):
            assert torch.isclose(pool, img).all(1).any()
    sub = ds.subset(torch.arange(10))
    assert len(sub) == 10 and sub.mean is ds.mean


def test_zca_matches_kornia():
    import kornia

    # digits: 1,024-d images keep the whitening SVD cheap (CIFAR's 3,072-d costs ~27x more)
    prepare(resolve_config("digits"), progress=False)
    ds = load_dataset("digits", "train", zca_eps=0.1)
    plain = load_dataset("digits", "train")
    x = plain.normalize(plain.images)
    ref = kornia.enhance.ZCAWhitening(eps=0.1).fit(x)(x)
    # two float32 fits of one whitening (kornia's and the cached one, each an SVD of a 1,024-d
    # covariance regularised by 0.1): their rounding, amplified by the regulariser's condition
    # number, not a summation order (measured: 0.006 of the allowance)
    torch.testing.assert_close(ds.normalize(ds.images), ref, rtol=1e-3, atol=1e-3)
    # the second load reuses the cached matrix
    again = load_dataset("digits", "test", zca_eps=0.1)
    assert np.allclose(again.zca[0].numpy(), ds.zca[0].numpy())


def test_fused_normalisation_equals_the_formula():
    from d3fast.data.normalize import normalize_uint8

    x = torch.randint(0, 256, (4, 3, 5, 7), dtype=torch.uint8)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    ref = (x.double() / 255 - mean.double().view(1, -1, 1, 1)) / std.double().view(1, -1, 1, 1)
    # two float32 roundings of values below 4 (ulp 4.8e-7), elementwise: the same on any CPU
    # (measured: 0.39 of the allowance)
    torch.testing.assert_close(normalize_uint8(x, mean, std).double(), ref, rtol=0, atol=1e-6)
    # channels_last input (FFCV's batches) keeps its layout and values
    cl = normalize_uint8(x.contiguous(memory_format=torch.channels_last), mean, std)
    torch.testing.assert_close(cl, normalize_uint8(x, mean, std), rtol=0, atol=0)


def _toy(counts: list[int]):
    from d3fast.data.loader import DeviceDataset

    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))
    labels = labels[perm]
    # image i holds the value i: a sampled image names its index
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1)
    ds = DeviceDataset(images, labels, torch.zeros(1), torch.full((1,), 1 / 255), [str(c) for c in range(len(counts))])
    return ds, labels


def test_per_class_sampling_is_uniform_without_replacement_and_never_syncs():
    from tests._utils import HostSyncs

    ds, labels = _toy([7, 3, 12])  # class 1 has fewer than n images: drawn with replacement
    n, rounds = 5, 3000
    ds.sample_per_class(n)  # builds the class table (its one sync)
    g = torch.Generator().manual_seed(0)
    with HostSyncs() as syncs:
        draws = [ds.sample_per_class(n, g).view(3, n).round().long() for _ in range(rounds)]
    assert syncs.records == []
    hits = torch.zeros(len(labels))
    for idx in draws:
        assert all(bool((labels[idx[c]] == c).all()) for c in range(3))  # every row is its class
        for c in (0, 2):  # enough images: no repeats within a draw
            assert len(set(idx[c].tolist())) == n
        hits.index_add_(0, idx.flatten(), torch.ones(idx.numel()))
    # each image of class c is drawn n / count_c of the time (with replacement: n / 3 copies)
    for c, count in enumerate([7, 3, 12]):
        share = hits[labels == c] / (rounds * n / count)
        assert float((share - 1).abs().max()) < 0.1, share
