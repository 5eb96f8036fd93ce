"""A d3fast `pt` export scored by DD-Ranking (pip `ddranking` 0.2.0), as an external evaluator.

DD-Ranking pins numpy < 2 and imports with torch 2.14.1 + torchvision 0.29.1, so it lives in a
venv of its own; this script imports only torch and ddranking, never d3fast:

    python3 -m venv .venv-ddranking
    .venv-ddranking/bin/pip install torch==2.14.1 torchvision==0.29.1 ddranking==0.2.0
    d3fast export RUN --format pt --pixels --out export/           # pixels: DD-Ranking normalises its own way
    .venv-ddranking/bin/python scripts/ddranking_score.py export/ --data-path REAL_ROOT \
        [--dataset TinyImageNet] [--model ConvNet-4] [--epochs 300] [--num-eval 5] \
        [--full-data-acc 38.5 | --eval-full-data] [--device cuda] [--out score.json]

What it does with the export (module of DD-Ranking: metrics/hard_label.py, LabelRobustScoreHard):
- images: pixels in [0, 1] normalised with DD-Ranking's own mean/std for the dataset (it reads its
  real data with those, not with d3fast's prepared statistics), [N, 3, H, W]; DD-Ranking builds
  every model with 3 input channels, so greyscale datasets are refused.
- labels: the export's class-major hard labels; the lr: the export's learned student lr.
- dataset: DD-Ranking knows only its own list (CIFAR10, CIFAR100, TinyImageNet, ImageNette,
  ImageWoof, ImageNet1K); d3fast's name maps to it, or pass --dataset. Its TinyImageNet and ImageNet
  readers are torchvision ImageFolders: REAL_ROOT/train/<class>/ and REAL_ROOT/val/<class>/.
- the score: Label-Robust Score (LRS) = (e^a - e^-1) / (e - e^-1), a = l IOR - (1 - l) HLR with
  l = 0.5, HLR = full-data accuracy - distilled accuracy, IOR = distilled - random accuracy (a random
  real set of the same images per class, its lr searched over 5 values). Accuracies are the best test
  accuracy over checkpoints every 10 epochs (selection on the test set, unlike d3fast's
  last-epoch accuracy), DD-Ranking seeds from the clock (runs differ), and there is no equal-storage
  baseline. The full-data accuracy is cached by DD-Ranking for ResNet-18-BN on TinyImageNet and
  ImageNet1K only: otherwise give --full-data-acc (measured once) or --eval-full-data (trains on the
  whole train set).

Prints and writes (--out) JSON: DD-Ranking's means and stds, plus what was run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "tinyimagenet": "TinyImageNet", "imagenette": "ImageNette",
            "imagewoof": "ImageWoof", "imagenet64": "ImageNet1K"}
# the keys DD-Ranking's DSA reads (aug/dsa.py), at the DSA paper's values, as d3fast's DSA uses
DSA_PARAMS = {"scale": 1.2, "rotate": 15.0, "flip": 0.5, "brightness": 1.0, "saturation": 2.0, "contrast": 0.5,
              "crop": 0.125, "cutout": 0.5, "siamese": False, "latestseed": -1}


def fail(msg: str) -> None:
    sys.stderr.write(f"error: {msg}\n")
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("export", type=Path, help="a `d3fast export --format pt --pixels` directory")
    p.add_argument("--data-path", required=True, help="DD-Ranking's real data root for the dataset")
    p.add_argument("--dataset", default=None, help="DD-Ranking's dataset name (default: from the export's)")
    p.add_argument("--model", default=None, help="DD-Ranking model name (default: ConvNet-<depth of the export's run>)")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: the export's eval.epochs)")
    p.add_argument("--num-eval", type=int, default=5)
    p.add_argument("--aug", choices=["dsa", "cutmix", "none"], default="dsa",
                   help="student augmentation (dsa: as d3fast; cutmix: DD-Ranking's default)")
    p.add_argument("--full-data-acc", type=float, default=None, help="test accuracy (%%) of the model on all real data")
    p.add_argument("--eval-full-data", action="store_true", help="measure the full-data accuracy (slow)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    a.export = a.export.resolve()  # the scorer runs in a directory of its own
    a.out = a.out.resolve() if a.out else None

    import torch

    info_path = a.export / "d3fast_export.json"
    if not info_path.is_file():
        fail(f"{a.export} is not a d3fast pt export (no d3fast_export.json): run `d3fast export RUN --format pt "
             "--pixels --out DIR`")
    info = json.loads(info_path.read_text())
    if info.get("format") != "pt" or not info.get("pixels"):
        fail(f"{a.export} must be a pt export in pixels: `d3fast export RUN --format pt --pixels --out DIR`")
    dataset = a.dataset or DATASETS.get(info["dataset"])
    if dataset is None:
        fail(f"DD-Ranking does not know d3fast's dataset {info['dataset']!r}; pass --dataset "
             f"({', '.join(sorted(set(DATASETS.values())))})")
    images = torch.load(a.export / "images.pt", weights_only=True)
    labels = torch.load(a.export / "labels.pt", weights_only=True)
    lr = float(torch.load(a.export / "lr.pt", weights_only=True))
    if images.dim() != 4 or images.shape[1] != 3:
        fail(f"DD-Ranking builds 3-channel models; the export holds images of shape {list(images.shape)}")
    cfg = info.get("config") or {}
    depth = cfg.get("net", {}).get("depth") or {32: 3, 64: 4, 128: 5}.get(images.shape[-1], 3)
    model = a.model or f"ConvNet-{depth}"
    epochs = a.epochs or cfg.get("eval", {}).get("epochs", 300)
    counts = torch.bincount(labels)
    if len(set(counts.tolist())) != 1:
        fail(f"DD-Ranking takes the same number of images per class; the export holds {counts.tolist()}")
    ipc = int(counts[0])

    import ddranking.metrics.hard_label as hard_label
    from ddranking.metrics import LabelRobustScoreHard
    from ddranking.utils import get_dataset
    from ddranking.utils import train_and_eval as tae

    # DD-Ranking 0.2.0 appends each LRS twice (metrics/hard_label.py), so its CSV writer fails on
    # columns of unequal length after every evaluation: write the lists as JSON instead (the mean
    # and std it reports are those of the doubled list, which equal the plain list's)
    def save_results(results: dict, path: str) -> None:
        Path(path).with_suffix(".json").write_text(json.dumps({k: [float(x) for x in v] for k, v in results.items()}))

    hard_label.save_results = save_results

    if a.full_data_acc is not None:  # DD-Ranking looks the full-data accuracy up in this table
        tae.REAL_DATA_ACC_CACHE[f"{dataset}-{model}"] = a.full_data_acc
    elif not a.eval_full_data and f"{dataset}-{model}" not in tae.REAL_DATA_ACC_CACHE:
        fail(f"DD-Ranking has no full-data accuracy for {dataset}-{model}: pass --full-data-acc or --eval-full-data")
    size = tuple(images.shape[-2:])
    _, _, mean, std, n_classes, *_ = get_dataset(dataset, a.data_path, size, False, None, a.device)
    if n_classes != len(counts):
        fail(f"DD-Ranking's {dataset} has {n_classes} classes; the export {len(counts)}")
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    work = (a.out.parent if a.out else a.export.parent) / f"{a.export.name}.ddranking"
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # DD-Ranking writes ./random_data and results relative to the working directory
    scorer = LabelRobustScoreHard(
        dataset=dataset, real_data_path=str(Path(a.data_path).resolve()), ipc=ipc, model_name=model,
        data_aug_func="none" if a.aug == "none" else a.aug,
        aug_params=DSA_PARAMS if a.aug == "dsa" else {"cutmix_p": 1.0}, optimizer="sgd", lr_scheduler="step",
        step_size=max(1, epochs // 2), num_eval=a.num_eval, im_size=size, num_epochs=epochs,
        num_workers=a.workers, save_path=str(work / "lrs.csv"), device=a.device,
        eval_full_data=a.eval_full_data, random_data_path=str(work / "random_data"),
    )
    result = scorer.compute_metrics(image_tensor=((images - m) / s).to(a.device), hard_labels=labels.to(a.device),
                                    syn_lr=lr)
    report = {"ddranking": {k: float(v) for k, v in result.items()}, "dataset": dataset, "model": model, "ipc": ipc,
              "epochs": epochs, "num_eval": a.num_eval, "aug": a.aug, "syn_lr": lr,
              "full_data_acc": a.full_data_acc, "d3fast_export": str(a.export.resolve()), "d3fast_step": info.get("step")}
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
