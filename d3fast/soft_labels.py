"""Soft labels for a distilled object (docs/algorithm.md section 9.2; the reference's
`soft_label.py`): each prior's mean image f(mu) is labelled by the softmax of a network
trained on ALL classes of the dataset, an expert trajectory at epoch
`distill.soft_label_epoch` (the reference takes epochs 9, 12 and 13 for its three ImageNet-1K
budgets). The labels are [priors, classes] probabilities, stored with the object and
counted in its storage (4 bytes each: 4 MB for 1,000 classes at 1 prior per class, a third
of the 12.3 MB that one 64 px image per class takes).

Objects of one subtask are labelled after the merge (their students see every class only
then); `d3fast distill` labels whole-dataset runs at their end and merged objects when the
merge is made, `d3fast label` (re)labels either.
"""

from __future__ import annotations

import torch

from d3fast.distilled import Distilled, Merged, Sampler

# mean images through the labelling network per forward pass (the reference's batch of 50;
# the network is in eval mode, so the batch size does not change the labels)
LABEL_BATCH = 50


@torch.no_grad()
def soft_labels(d: Distilled | Merged, net: torch.nn.Module, bn: str = "batch") -> torch.Tensor:
    """softmax(net(f(mu))) for every prior of `d`: [C * PPC, classes] float32 probabilities
    (mean images decoded as evaluation decodes samples: `bn` as eval.decoder_bn)."""
    means = Sampler(d, bn).means()
    out = [torch.softmax(net(x).float(), dim=1) for x in means.split(LABEL_BATCH)]
    return torch.cat(out)


