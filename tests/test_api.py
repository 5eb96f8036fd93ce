"""The Python API (d3fast/api.py): the block of docs/python-api.md runs as it is, and the
API's pieces behave as documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import d3fast
from d3fast.errors import D3FastError
from d3fast.run import Run

# its block is marked `<!-- tested: tests/test_api.py -->`: tests/test_docs.py leaves it to this file
PAGE = Path(__file__).resolve().parent.parent / "docs" / "python-api.md"


def _page_block() -> str:
    return re.search(r"```python\n(.*?)```", PAGE.read_text(), re.S).group(1)


@pytest.mark.slow
def test_python_api_page_block_runs(d3fast_home, tmp_path, capsys):
    scope: dict = {}
    exec(compile(_page_block(), "docs/python-api.md", "exec"), scope)
    run, d, images, labels, report = (scope[k] for k in ("run", "d", "images", "labels", "report"))
    assert Path(run).is_dir() and (Path(run) / "checkpoint.pt").exists() and run.parent.parent == d3fast_home / "runs"
    assert images.shape == (100, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert labels.tolist() == [c for c in range(10) for _ in range(10)]
    x, _ = scope["x"], scope["y"]
    # pixels are the normalised samples, de-normalised (same draw: same seed, another BatchNorm mode aside)
    px, _ = d.sample(10, pixels=True, bn="batch")
    m, s = torch.tensor(d.meta["mean"]).view(1, -1, 1, 1), torch.tensor(d.meta["std"]).view(1, -1, 1, 1)
    torch.testing.assert_close(px, (x * s + m).clamp(0, 1))
    assert set(report["results"]["convnet"]) == {"d3", "random_same_count", "random_same_storage", "herding_same_storage", "kcenter_same_storage"}
    assert (Path(run) / "evals" / "index.json").exists()
    # eval mode is the default, and sampling leaves the object as it was
    before = [t.clone() for t in d.decoder.state_dict().values()]
    ev, _ = d.sample(3)
    assert not torch.equal(ev, d.sample(3, bn="batch")[0])
    assert all(torch.equal(a, b) for a, b in zip(before, d.decoder.state_dict().values(), strict=True))
    with pytest.raises(D3FastError, match="n_per_class must be >= 1"):
        d.sample(0)
    with pytest.raises(D3FastError, match="not prepared|unknown dataset"):
        d3fast.distill("cifar11")
    assert "Python API" not in capsys.readouterr().err


def test_api_set_takes_torch_dtypes_and_refuses_what_is_no_config_value():
    from d3fast.api import _sets

    assert _sets({"distill.dtype": torch.float64, "distill.steps": 3, "eval.archs": ["convnet"]}) == [
        "distill.dtype=float64", "distill.steps=3", 'eval.archs=["convnet"]']
    with pytest.raises(D3FastError, match=r"set\['distill.seed'\]: object .* is not a config value"):
        _sets({"distill.seed": object()})


def test_api_set_takes_nested_sections_and_refuses_bad_shapes_and_names(d3fast_home):
    # issue 32: a nested `set` key, a non-string dataset and sample(10**12) were "unexpected" crashes
    from d3fast.api import _sets

    assert _sets({"distill": {"steps": 3, "ppc": 2}, "net.width": 32}) == ["distill.steps=3", "distill.ppc=2",
                                                                          "net.width=32"]
    for bad, message in (({1: 2}, "keys are config keys"), ("distill.steps=3", "a mapping"), ([3], "a mapping")):
        with pytest.raises(D3FastError, match=message):
            _sets(bad)
    with pytest.raises(D3FastError, match="'distill.steps' is a value, not a section: there is no distill.steps.x"):
        d3fast.distill("digits", set={"distill.steps.x": 1})
    with pytest.raises(D3FastError, match="dataset must be a string such as 'digits', not int 5"):
        d3fast.distill(5)  # type: ignore[arg-type]
    with pytest.raises(D3FastError, match="target must be a string"):
        d3fast.evaluate(3.5)  # type: ignore[arg-type]


def test_sample_refuses_more_images_than_memory_before_allocating():
    from d3fast.distilled import init_distilled

    meta = {"resolution": 8, "channels": 1, "mean": [0.5], "std": [0.5], "z_dim": 4, "decoder": "paper",
            "decoder_width": 8}
    d = init_distilled(10, 1, [str(i) for i in range(10)], meta, 0.01, torch.device("cpu"), seed=0)
    with pytest.raises(D3FastError, match=r"sample: 1,000,000,000,000 per class x 10 classes of 1x8x8 needs ~"
                                          r"[\d,.]+ GiB, more than the [\d.]+ GiB free on cpu"):
        d.sample(10**12)
    x, y = d.sample(3)
    assert x.shape == (30, 1, 8, 8) and y.tolist() == [c for c in range(10) for _ in range(3)]


def test_api_names_are_the_functions_even_after_the_modules_load():
    import d3fast.recipes.distill  # noqa: F401  the training loop's module of the same name
    import d3fast.recipes.evaluate  # noqa: F401

    assert callable(d3fast.distill) and d3fast.distill.__module__ == "d3fast"
    assert callable(d3fast.evaluate) and callable(d3fast.load)
    from d3fast.recipes.distill import distill as loop

    assert loop.__module__ == "d3fast.recipes.distill"


def test_api_takes_what_the_command_line_takes_and_raises_one_line_errors(home, tmp_path):
    """steps as the command line parses --steps (a numpy int, "2"), "" as not given, and a
    place that cannot be written as the D3FastError the command prints (not an OSError)."""
    import numpy as np

    from tests._utils import OVERRIDES

    tiny = [o for o in OVERRIDES if not o.startswith("distill.steps")]
    run = d3fast.distill("digits", steps=np.int64(2), set=tiny, runs_dir=tmp_path / "runs", name="", device="")
    assert run.name.endswith("-digits") and len(Run(run).read_metrics()) == 2
    with pytest.raises(D3FastError, match="expected int, got 'abc'"):
        d3fast.distill("digits", steps="abc", set=tiny, runs_dir=tmp_path / "runs")
    (tmp_path / "afile").write_text("")
    with pytest.raises(D3FastError, match="cannot use .*afile.*not a directory"):
        d3fast.distill("digits", steps="2", set=tiny, runs_dir=tmp_path / "afile")


def test_api_refuses_what_the_breaker_fed_it(d3fast_home, tmp_path):
    # issue 32's second round: an iterator for `set` (its check used it up and the run went on
    # without the overrides), an int, a 5,000-digit value; load('') and unknown devices
    from d3fast.api import _sets

    for bad in (iter(["distill.steps=0"]), 5):
        with pytest.raises(D3FastError, match="set: a mapping"):
            _sets(bad)  # type: ignore[arg-type]
    with pytest.raises(D3FastError, match=r"set\['distill.steps'\]: int .* is not a config value"):
        _sets({"distill.steps": 10**5000})
    with pytest.raises(D3FastError, match="load: name a run directory"):
        d3fast.load("")
    for device, message in (("meta", "unknown device 'meta'"), ("bogus", "unknown device 'bogus'")):
        with pytest.raises(D3FastError, match=message):
            d3fast.load(tmp_path, device=device)
