"""Expert training throughput on real Fashion-MNIST (Debian's dataset-fashion-mnist):
ConvNet-3 (width 128, instance norm), batch 256, SGD, with and without DSA."""

from __future__ import annotations

import os

import pytest
import torch

from d3fast.config import resolve_config
from d3fast.data.augment import DSA
from d3fast.data.loader import load_dataset
from d3fast.data.prepare import prepare
from d3fast.models import build_network
from d3fast.runtime import resolve_device
from d3fast.training import train_epoch

BATCHES = 20


@pytest.mark.parametrize("augment", [True, False], ids=["dsa", "no-aug"])
def test_expert_epoch_throughput(benchmark, provenance, home, augment):
    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("needs Debian's dataset-fashion-mnist")
    cfg = resolve_config("fashion-mnist")
    prepare(cfg, progress=False)
    device = resolve_device("auto")
    data = load_dataset("fashion-mnist", "train", device).subset(torch.arange(256 * BATCHES, device=device))
    net = build_network("convnet", 1, 10, 28).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    aug = DSA(cfg.augment) if augment else None
    g = torch.Generator(device=device).manual_seed(0)
    train_epoch(net, opt, data.subset(torch.arange(512, device=device)), 256, g, aug)  # warm-up

    def epoch():
        loss, _ = train_epoch(net, opt, data, 256, g, aug)  # .item() inside synchronises
        return loss

    benchmark.pedantic(epoch, rounds=3, iterations=1)
    benchmark.extra_info.update(
        images=len(data), images_per_s=round(len(data) / benchmark.stats["median"], 1)
    )
