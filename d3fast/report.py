"""Every text table and time/hours format of d3fast's reports, one home each: the
evaluation table (eval.md, the terminal), `d3fast runs`, `d3fast budget`.
"""

from __future__ import annotations

from typing import Any

CORESET_NAMES = {"herding_same_storage": "herding coreset, same storage",
                 "kcenter_same_storage": "k-center greedy coreset, same storage"}


def markdown(r: dict[str, Any]) -> str:
    """The report as a markdown table (eval.md)."""
    head, rows = table_rows(r)
    lines = head + ["", "| arch | training set | images/class | lr | test accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines) + "\n"


def rendered(r: dict[str, Any]) -> str:
    """The report as aligned plain text, for a terminal or a log file."""
    head, rows = table_rows(r)
    table = text_table([["arch", "training set", "images/class", "lr", "test accuracy"], *rows], right=(2, 3),
                              rule=True)
    return "\n".join([head[0].lstrip("# "), *head[2:], "", table]) + "\n"


def table_rows(r: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(heading lines, [arch, training set, images/class, accuracy] rows) of a report."""
    if r.get("target", "distilled") != "distilled":
        return _set_rows(r)
    lines = [
        f"# Evaluation of {r['run_dir']} (step {r['distill_step']})",
        "",
        f"{r['dataset']}, PPC {r['ppc']}, "
        + (f"merged from {r['subtasks']} subtasks (mean of their learned lrs: " if r.get("subtasks", 1) > 1
           else "learned student lr ")
        + f"{r['student_lr']:.4g}{')' if r.get('subtasks', 1) > 1 else ''}; "
        + ("soft labels (temperature " f"{r['protocol'].get('soft_temperature', 1.0):g}); " if r.get("soft_labels") else "")
        + "storage "
        f"{r['storage_bytes'] / 2**20:.2f} MiB = {r['images_per_class_equivalent']} uint8 images per class. "
        f"{r['protocol']['students']} students x {r['protocol']['epochs']} epochs each; "
        "test accuracy after the last epoch (no selection).",
        protocol_line(r["protocol"]),
    ]
    names = {"d3_soft": "D3 (fresh samples), soft labels", "d3": "D3 (fresh samples)" + (
        ", hard labels" if r.get("soft_labels") else ""), "random_same_count": "random real, same count",
             "random_same_storage": "random real, same storage", **CORESET_NAMES}
    fixed = not r["protocol"].get("fresh_samples", True)
    if fixed:
        names |= {k: v.replace("fresh samples", "one fixed draw") for k, v in names.items() if k.startswith("d3")}
    used = r["protocol"].get("samples_per_class_used", r["protocol"]["samples_per_class"])
    per_epoch = f"{r['protocol']['samples_per_class'] if fixed else used}" + ("" if fixed else " per epoch")
    return lines, _result_rows(r, names, per_epoch)


def protocol_line(p: dict[str, Any]) -> str:
    """How the rows were made comparable: steps per epoch and the lr policy (older reports: '')."""
    if "protocol" not in p:
        return ""
    if p["protocol"] == "equal_steps":
        steps = (f"Every row: {p['examples_per_epoch']} examples = {p['steps_per_epoch']} SGD steps (batch "
                 f"{p['batch_size']}) per epoch, a smaller set cycled through.")
    else:
        steps = "One pass over each row's own set per epoch (protocol per_set: step counts differ)."
    if p.get("lr_grid"):
        lrs = (f" lr per row: the best of {', '.join(f'{v:g}' for v in p['lr_grid'])} and its own (the learned or "
               f"the set's; random real: {p['lr_real']:g}) by accuracy on {p['val_per_class']} held-out train images "
               "per class.")
    else:
        lrs = f" lr: the learned or the set's for the target's rows, {p['lr_real']:g} for random real (no search)."
    return steps + lrs


def _result_rows(r: dict[str, Any], names: dict[str, str], own_count: str) -> list[list[str]]:
    rows = []
    for arch, kinds in r["results"].items():
        for kind, v in kinds.items():
            n = v["images_per_class"]
            rows.append([arch, names[kind], own_count if n is None else str(n),
                         f"{v['lr']:.3g}" if isinstance(v.get("lr"), int | float) else "-",
                         f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f} % (n={len(v['accs'])})"])
        if "random_same_count" in kinds and "random_same_storage" not in kinds:
            rows.append([arch, names["random_same_storage"], "-", "-",
                         "not applicable: less than one uint8 image per class is stored"])
    return rows


def _set_rows(r: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    kind = "ImageFolder (uint8 PNG)" if r["target"] == "imagefolder" else ".pt (float32)"
    head = [
        f"# Evaluation of {r['run_dir']}",
        "",
        f"{r['dataset']}, a fixed set of {r['images']} images ({kind}, "
        + (f"{r['per_class_min']}..{r['per_class_max']} per class" if r.get("per_class_min", 0) != r.get(
            "per_class_max", 0) else f"{r['images_per_class']} per class")
        + (", soft labels" if r.get("soft_labels") else "") + f"); student lr {r['student_lr']:.4g} from "
        f"{r['lr_from']}; storage {r['storage_bytes'] / 2**20:.2f} MiB = {r['images_per_class_equivalent']} uint8 "
        f"images per class. {r['protocol']['students']} students x {r['protocol']['epochs']} epochs each; "
        "test accuracy after the last epoch (no selection).",
        protocol_line(r["protocol"]),
    ]
    names = {"set_soft": "the set, soft labels", "set": "the set" + (", hard labels" if r.get("soft_labels") else ""),
             "random_same_count": "random real, same count", "random_same_storage": "random real, same storage",
             **CORESET_NAMES}
    return head, _result_rows(r, names, str(r["images_per_class"]))


def summary_line(r: dict[str, Any]) -> str:
    out = []
    for arch, kinds in r["results"].items():
        parts = [f"{k} {100 * v['mean']:.1f}±{100 * v['std']:.1f}%" for k, v in kinds.items()]
        out.append(f"{arch}: " + ", ".join(parts))
    return "; ".join(out)


def _fmt_h(h: float) -> str:
    """Two significant digits below 1 h (a 4-step test run costs 0.0012 h, not "0.00")."""
    if h >= 100:
        return f"{h:.0f}"
    if h >= 10:
        return f"{h:.1f}"
    if h >= 1 or h == 0:
        return f"{h:.2f}"
    return f"{h:.2g}"


def _hours(h: float) -> str:
    return f"{h:.3f}" if h >= 0.001 or h == 0 else "<0.001"


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def text_table(rows: list[list[str]], right: tuple[int, ...] = (), rule: bool = False) -> str:
    """Rows of cells as aligned plain text (two spaces between columns, trailing blanks
    stripped): columns in `right` right-aligned, with `rule` a line of dashes under the first
    row (the header). Used by `d3fast budget`, `d3fast runs` and the evaluation table."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    lines = [line(r).rstrip() for r in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any, width: int = 60) -> str:
    """A value read from a run's files as one table cell: printable, one line, at most `width`."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value or "-"))
    return text if len(text) <= width else text[: width - 3] + "..."


def runs_table(rows: list[dict[str, Any]]) -> str:
    """`d3fast runs`: one line per run of `d3fast.run.list_runs`."""
    table = [["run", "dataset", "preset", "step", "status", "MTT", "best loss", "hours", "last evaluation"]]
    for r in rows:
        hours = "" if r["device_hours"] is None else f"{r['device_hours']:.3g} {r['hours_unit']}"
        best = "" if r["best_loss"] is None else f"{r['best_loss']:.4g}"
        table.append([r["name"], r["dataset"], r["preset"], f"{r['step']}/{r['steps']}", r["status"],
                      _cell(r["mtt_health"]), best, hours, r["last_eval"]])
    return text_table([[str(v) for v in row] for row in table])
