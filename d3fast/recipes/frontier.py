"""`d3fast frontier`: D3 against real images of equal storage, budget by budget.

For each storage format (distill.storage) and each budget of uint8 images per class, one run
distils the object `--budget-ipc` chooses for that budget in that format (d3fast/storage.py
`choose_budget`), named frontier-<budget>ipc-<storage> in the dataset's runs folder (an
unfinished run is continued, a finished one reused: `--resume auto` semantics), and is
evaluated under one protocol (`d3fast evaluate`: D3, and at the object's own storage random
real images, a herding coreset and a k-center greedy coreset; a kept evaluation of the same
step and protocol is reused). The table (frontier.md, frontier.json) and a plot of accuracy
against uint8 images per class (frontier.png) go to <runs>/<dataset>/frontier/; the table
says, per budget, by how many points D3 beats the best of the three baselines, or loses to it.

A budget that the format cannot fit (its smallest object is larger) is a row that says so,
naming the smallest budget that fits; the baselines' images per class are the object's bytes
over one uint8 image (rounded down: the real sets never hold more bytes than the object).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from d3fast.config import STORAGES, Config, resolve_config
from d3fast.data.datasets import get_spec
from d3fast.errors import D3FastError
from d3fast.io import atomic_path, atomic_write_json, atomic_write_text, read_json, utc_timestamp
from d3fast.recipes.label import has_labelling_expert
from d3fast.report import CORESET_NAMES
from d3fast.run import Run, runs_folder
from d3fast.runtime import resolve_device
from d3fast.storage import choose_budget

# the rows a D3 point is compared with, all at the object's storage (d3fast/recipes/evaluate.py)
BASELINES = {"random_same_storage": "random real", "herding_same_storage": "herding",
             "kcenter_same_storage": "k-center greedy"}
# the eval.* keys that make two evaluations comparable (a kept one is reused when they match)
PROTOCOL_KEYS = ("protocol", "students", "epochs", "batch_size", "samples_per_class", "fresh_samples", "momentum",
                 "weight_decay", "lr_real", "lr_grid", "val_per_class", "decoder_bn", "seed", "soft_temperature")
MAX_BUDGETS = 32
MAX_PPC = 10000  # distill.ppc's range (d3fast/config.py)


def parse_budgets(text: str) -> list[float]:
    """"8,16,32" -> [8.0, 16.0, 32.0]: finite positive numbers, sorted, each once.

    Raises:
        D3FastError: an empty list, a value that is not a positive finite number, too many."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        values = sorted({float(t) for t in items})
    except ValueError:
        raise D3FastError(f"--budgets takes comma-separated numbers of uint8 images per class, got {text!r}") from None
    if not values or not all(math.isfinite(v) and 0 < v <= 1e6 for v in values) or len(values) > MAX_BUDGETS:
        raise D3FastError(f"--budgets takes 1 to {MAX_BUDGETS} numbers of uint8 images per class in (0, 1e6], "
                          f"got {text!r}")
    return values


def parse_storages(text: str) -> list[str]:
    """"int8,float32" -> ["int8", "float32"] (each once, in the order given).

    Raises:
        D3FastError: an empty list or an unknown format."""
    items = list(dict.fromkeys(t.strip() for t in str(text).split(",") if t.strip()))
    bad = [t for t in items if t not in STORAGES]
    if not items or bad:
        raise D3FastError(f"--storage takes formats from {', '.join(STORAGES)} (comma-separated), got {text!r}")
    return items


def _run_name(budget: float, storage: str) -> str:
    return f"frontier-{budget:g}ipc-{storage}"


def _fits(cfg: Config, budget: float, storage: str) -> str | None:
    """None when `budget` buys an object in `storage`, else why not (naming the smallest budget).

    Raises:
        D3FastError: a budget that buys more priors than distill.ppc allows."""
    spec = get_spec(cfg.data.dataset)
    try:
        choice = choose_budget(budget, num_classes=spec.num_classes, channels=spec.channels, res=spec.resolution,
                               subtasks=cfg.data.subtasks, soft_labels=cfg.distill.soft_labels, storage=storage)
    except D3FastError as e:
        return str(e)
    if choice.ppc > MAX_PPC:
        raise D3FastError(f"a budget of {budget:g} uint8 images per class buys {choice.ppc:,} priors per class in "
                          f"{storage}, more than distill.ppc's limit of {MAX_PPC:,}: give smaller budgets")
    return None


def _kept_report(run: Run, step: int, cfg: Config) -> dict[str, Any] | None:
    """The run's latest evaluation when it is of `step` under cfg's eval protocol, with every row."""
    if not run.eval_json_path.is_file():
        return None
    try:
        old = read_json(run.eval_json_path, "evaluation")
    except D3FastError:
        return None  # damaged: evaluate again
    e = cfg.eval
    if not isinstance(old, dict) or old.get("distill_step") != step or not isinstance(old.get("protocol"), dict):
        return None
    if any(old["protocol"].get(k) != getattr(e, k) for k in PROTOCOL_KEYS) or list(old.get("results", {})) != e.archs:
        return None
    want = {"d3", "random_same_storage"}
    if e.coresets and ("coreset_features" in old or has_labelling_expert(cfg)):
        # coreset rows: kept ones must be there; none kept and none possible (no expert) is a match
        want |= {f"{c}_same_storage" for c in e.coresets}
    if any(not want <= set(rows) for rows in old["results"].values()):
        return None
    return old


def _evaluated(path: Path, eval_over: dict[str, Any], device: str | None, progress: bool) -> dict[str, Any]:
    from d3fast.recipes.evaluate import _with, evaluate, run_target

    dev = resolve_device(device or "auto")
    target = run_target(Run(path), dev)
    _with(target.cfg, {"eval": eval_over} if eval_over else None)
    assert target.run is not None and target.step is not None
    kept = _kept_report(target.run, target.step, target.cfg)
    if kept is not None:
        click.echo(f"reusing the evaluation of {path.name} at step {target.step}")
        return kept
    return evaluate(target, dev, progress=progress)


def _point(storage: str, budget: float, path: Path, report: dict[str, Any]) -> dict[str, Any]:
    arch = next(iter(report["results"]))
    rows = report["results"][arch]
    cell = {k: {"images_per_class": v["images_per_class"], "mean": v["mean"], "std": v["std"], "n": len(v["accs"])}
            for k, v in rows.items() if k == "d3" or k in BASELINES}
    best = max((k for k in cell if k in BASELINES), key=lambda k: cell[k]["mean"], default=None)
    return {"storage": storage, "budget": budget, "run": str(path), "arch": arch, "fits": True,
            "object_images_per_class": report["images_per_class_equivalent"], "storage_bytes": report["storage_bytes"],
            "ppc": report.get("ppc"), "step": report["distill_step"], "rows": cell, "best_baseline": best,
            "margin": None if best is None else cell["d3"]["mean"] - cell[best]["mean"]}


def frontier(dataset: str | None, preset: str | None, overrides: tuple[str, ...] | list[str], budgets: list[float],
             storages: list[str], runs_dir: str, students: int | None = None, epochs: int | None = None,
             device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """`d3fast frontier` (module docstring): distil (or continue, or reuse) and evaluate one run
    per (storage, budget), write frontier.json, frontier.md and frontier.png, return the table.

    Raises:
        D3FastError: --set of a key the budget or --storage chooses; what `distill` or
            `evaluate` raises; `Interrupted` after Ctrl-C (finished runs and evaluations are kept,
            and the same command continues).
    """
    from d3fast.config import parse_overrides
    from d3fast.preflight import BUDGET_KEYS
    from d3fast.recipes.distill import DistillJob, command

    given = parse_overrides(list(overrides)).get("distill", {})
    taken = [k for k in (*BUDGET_KEYS, "distill.storage") if k.split(".")[1] in given]
    if taken:
        raise D3FastError(f"the frontier chooses {', '.join(taken)} per budget and --storage: drop the --set")
    cfg = resolve_config(dataset, preset, overrides, typed_overrides={"device": device} if device else None)
    dataset = cfg.data.dataset
    eval_over = {k: v for k, v in (("students", students), ("epochs", epochs)) if v is not None}
    todo = [(s, b) for s in storages for b in budgets]
    names: dict[str, float] = {}
    for storage, budget in todo:  # every refusal before any work
        name = _run_name(budget, storage)
        if name in names:
            raise D3FastError(f"the budgets {names[name]!r} and {budget!r} name the same run ({name}): give budgets "
                              "that differ in their first 6 digits")
        names[name] = budget
    why_not = {(s, b): _fits(cfg, b, s) for s, b in todo}
    out = runs_folder(runs_dir, dataset) / "frontier"
    if out.exists() and not out.is_dir():
        raise D3FastError(f"{out} is a file: the frontier writes its table into that folder; move the file away")
    points: list[dict[str, Any]] = []
    for i, (storage, budget) in enumerate(todo, 1):
        why = why_not[storage, budget]
        if why is not None:
            click.echo(f"[{i}/{len(todo)}] {budget:g} uint8 images per class in {storage}: no object fits ({why})")
            points.append({"storage": storage, "budget": budget, "fits": False, "why": why})
            continue
        click.echo(f"[{i}/{len(todo)}] {budget:g} uint8 images per class in {storage}: run {_run_name(budget, storage)}")
        job = DistillJob(runs_dir, dataset, preset, (*overrides, f"distill.storage={storage}"),
                         {"device": device} if device else {}, resume="auto", name=_run_name(budget, storage),
                         budget_ipc=budget, budget_images="uint8")
        path = command(job)
        points.append(_point(storage, budget, path, _evaluated(path, eval_over, device, progress)))
    table = {"dataset": dataset, "preset": cfg.preset, "budgets": budgets, "storages": storages, "points": points,
             "finished": utc_timestamp()}
    atomic_write_json(out / "frontier.json", table)
    atomic_write_text(out / "frontier.md", markdown(table))
    plot(table, out / "frontier.png")
    click.echo(markdown(table))
    click.echo(f"kept in {out}/ (frontier.md, frontier.json, frontier.png)")
    return table


def _cell(v: dict[str, Any] | None) -> str:
    if v is None:
        return "-"
    return f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f} ({v['images_per_class']} img)"


def verdict(p: dict[str, Any]) -> str:
    """One sentence: where D3 wins or loses at this point, by how many points, against what."""
    where = f"{p['budget']:g} uint8 images per class, {p['storage']}"
    if not p["fits"]:
        return f"{where}: no D3 object fits ({p['why']})"
    if p["best_baseline"] is None:
        return f"{where}: no baseline (the object stores less than one uint8 image per class)"
    best, d3 = p["rows"][p["best_baseline"]], p["rows"]["d3"]
    margin = 100 * p["margin"]
    noise = 100 * math.hypot(d3["std"], best["std"])
    word = "wins" if margin > 0 else "loses" if margin < 0 else "ties"
    return (f"{where}: D3 {word} by {abs(margin):.2f} points against {BASELINES[p['best_baseline']]} "
            f"({best['images_per_class']} images per class), the best baseline; std of the difference "
            f"~{noise:.2f} points" + (" (within it)" if abs(margin) <= noise else ""))


def markdown(table: dict[str, Any]) -> str:
    """The frontier as a markdown table and one verdict line per point."""
    head = ("| storage | budget (uint8 img/class) | object (uint8 img/class) | PPC | D3 | random real | herding | "
            "k-center greedy | D3 - best baseline |")
    lines = [f"# Accuracy against storage: {table['dataset']}", "",
             "Test accuracy (%) mean ± std over students, each row's images per class in parentheses; baselines "
             "hold the object's bytes in uint8 real images (rounded down).", "", head, "|" + "---|" * 9]
    for p in table["points"]:
        if not p["fits"]:
            lines.append(f"| {p['storage']} | {p['budget']:g} | no object fits | | | | | | |")
            continue
        r = p["rows"]
        margin = "-" if p["margin"] is None else f"{100 * p['margin']:+.2f}"
        lines.append(f"| {p['storage']} | {p['budget']:g} | {p['object_images_per_class']:.2f} | {p['ppc']} | "
                     f"{100 * r['d3']['mean']:.2f} ± {100 * r['d3']['std']:.2f} | {_cell(r.get('random_same_storage'))} | "
                     f"{_cell(r.get('herding_same_storage'))} | {_cell(r.get('kcenter_same_storage'))} | {margin} |")
    lines += ["", *(f"- {verdict(p)}" for p in table["points"])]
    return "\n".join(lines) + "\n"


def plot(table: dict[str, Any], path: Path) -> None:
    """Accuracy (%) against uint8 images per class (log scale): a D3 point per run (per storage
    format), and each baseline's points at their own images per class, with std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    fitted = [p for p in table["points"] if p["fits"]]
    xs_all: list[float] = []
    for storage in table["storages"]:
        pts = sorted((p for p in fitted if p["storage"] == storage), key=lambda p: p["object_images_per_class"])
        if pts:
            xs_all += [p["object_images_per_class"] for p in pts]
            ax.errorbar([p["object_images_per_class"] for p in pts], [100 * p["rows"]["d3"]["mean"] for p in pts],
                        yerr=[100 * p["rows"]["d3"]["std"] for p in pts], marker="o", capsize=3, label=f"D3 ({storage})")
    for kind, label in BASELINES.items():
        seen: dict[int, dict[str, Any]] = {}
        for p in fitted:
            v = p["rows"].get(kind)
            if v is not None and v["images_per_class"] not in seen:
                seen[v["images_per_class"]] = v
        if seen:
            xs = sorted(seen)
            xs_all += xs
            ax.errorbar(xs, [100 * seen[x]["mean"] for x in xs], yerr=[100 * seen[x]["std"] for x in xs],
                        marker="s" if kind in CORESET_NAMES else "^", linestyle="--", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    if xs_all:  # a single budget spans less than a factor of 2: no power of two would label it
        lo, hi = min(xs_all) / 1.5, max(xs_all) * 1.5
        ax.set_xlim(lo, hi)
        powers = [2.0 ** k for k in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
        ticks = sorted({x for x in powers if lo <= x <= hi} | {float(round(x)) for x in xs_all})
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("storage (uint8 images per class)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{table['dataset']}: accuracy against storage")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
