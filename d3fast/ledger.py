"""The device-hours ledger: what every phase cost, against the paper's budget.

Every phase (prepare, experts, distill, evaluate, profile) keeps one row in
`<home>/ledger.sqlite`, inserted when it starts and updated as it runs:

    dataset, preset, phase, run      what ran (run: the run directory, for distill/evaluate)
    device_kind, device_name, count  cuda | cpu; a CPU run is never counted as GPU time
    wall_s, device_hours             device_hours = wall_s x count / 3600
    steps, steps_target              distill steps / expert epochs / decoded images / ...
    energy_j                         NVML's energy counter (Volta and newer), else NULL
    status                           running | done | interrupted | failed

Why a row per phase, updated in place: a run killed with SIGKILL or a power cut cannot
write a final record, so the row is rewritten at most every `FLUSH_S` seconds (and at
every checkpoint); a killed run loses at most that much accounting. Readers report a
`running` row whose process is gone (same host) as `killed`, with the time it had logged.

Concurrency: SQLite in WAL mode, every write one short `BEGIN IMMEDIATE` transaction with
a 30 s busy timeout, so parallel runs (one per GPU, docs/algorithm.md section 9's class-parallel
TinyImageNet) append safely. Accounting never stops a run: a write that fails (locked
past the timeout, read-only home, full disk) prints one warning and the run goes on.
"""

from __future__ import annotations

import math
import os
import socket
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from d3fast.errors import D3FastError
from d3fast.io import pid_alive
from d3fast.paths import home
from d3fast.report import _fmt_h, _hms, _hours, text_table

# Seconds between row updates of a running phase: what a SIGKILL can cost the ledger.
FLUSH_S = 30.0
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    started       REAL NOT NULL,      -- unix time
    updated       REAL NOT NULL,
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    phase         TEXT NOT NULL,
    dataset       TEXT NOT NULL,
    preset        TEXT NOT NULL,
    run           TEXT,
    device_kind   TEXT NOT NULL CHECK (device_kind IN ('cuda', 'cpu')),
    device_name   TEXT NOT NULL,
    device_count  INTEGER NOT NULL,
    wall_s        REAL NOT NULL DEFAULT 0,
    device_hours  REAL NOT NULL DEFAULT 0,
    steps         INTEGER NOT NULL DEFAULT 0,
    steps_target  INTEGER,
    energy_j      REAL,
    status        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_dataset ON records (dataset, phase);
"""


@dataclass(frozen=True)
class PaperBudget:
    gpu_hours: float
    steps: int


# docs/algorithm.md section 8 (the paper's appendix C): distillation cost to convergence.
PAPER_BUDGETS: dict[str, PaperBudget] = {
    "cifar10": PaperBudget(10.0, 10_000),
    "tinyimagenet": PaperBudget(160.0, 20_000),
    "imagenette": PaperBudget(20.0, 3_000),
    "imagewoof": PaperBudget(20.0, 3_000),
}


def ledger_path() -> Path:
    return home() / "ledger.sqlite"


def hours_unit(device_kind: str) -> str:
    return "GPU-h" if device_kind == "cuda" else "CPU-h"


class Ledger:
    """The ledger file. Each call opens its own connection, so one Ledger may be shared by
    threads and every process sees the others' committed rows."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else ledger_path()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as e:
            raise D3FastError(f"cannot open the ledger {self.path}: {e}") from None
        with closing(con):
            # the pragmas read the header; a damaged page further in fails the query reading it,
            # inside the caller's block: both are the same one-line error
            try:
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, no fsync per row
                version = con.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, SCHEMA_VERSION):
                    raise D3FastError(f"ledger {self.path} has schema {version}; this d3fast writes {SCHEMA_VERSION}")
                if version == 0:
                    con.execute("BEGIN IMMEDIATE")
                    con.executescript(_SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};")
                yield con
            except sqlite3.DatabaseError as e:
                if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                    raise D3FastError(f"the ledger {self.path} stayed locked by another process for 30 s ({e}); "
                                      "try again once it is done") from None
                if isinstance(e, sqlite3.OperationalError) and ("disk" in str(e) or "I/O" in str(e)):
                    raise D3FastError(f"cannot write the ledger {self.path} ({e}: a full disk, a file size limit or "
                                      "a failing device)") from None
                raise D3FastError(
                    f"the ledger {self.path} is corrupt ({e}); move it aside (the runs themselves are "
                    "unaffected) and d3fast starts a new one"
                ) from None

    def insert(self, **row: Any) -> int:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            cur = con.execute(f"INSERT INTO records ({cols}) VALUES ({marks})", tuple(row.values()))
            con.execute("COMMIT")
            assert cur.lastrowid is not None  # set by every INSERT
            return int(cur.lastrowid)

    def update(self, row_id: int, **values: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            con.execute(f"UPDATE records SET {sets} WHERE id = ?", (*values.values(), row_id))
            con.execute("COMMIT")

    def records(self, dataset: str | None = None, run: str | None = None) -> list[dict[str, Any]]:
        """Rows oldest first; `status` of a running row whose process is gone reads `killed`."""
        if not self.path.exists():
            return []
        query, args = "SELECT * FROM records", []
        conds = []
        if dataset is not None:
            conds.append("dataset = ?")
            args.append(dataset)
        if run is not None:
            conds.append("run = ?")
            args.append(run)
        if conds:
            query += " WHERE " + " AND ".join(conds)
        with self._connect() as con:
            con.row_factory = sqlite3.Row
            rows = [dict(r) for r in con.execute(query + " ORDER BY id", args)]
        for r in rows:
            bad = _bad_field(r)
            if bad is not None:
                raise D3FastError(f"the ledger {self.path} is corrupt (record {r.get('id')}: {bad}); move it aside "
                                  "(the runs themselves are unaffected) and d3fast starts a new one")
        here = socket.gethostname()
        for r in rows:
            if r["status"] == "running" and r["host"] == here and not pid_alive(r["pid"]):
                r["status"] = "killed"
        return rows


class _Energy:
    """NVML's cumulative energy counter (mJ, Volta and newer) of one GPU; None elsewhere."""

    def __init__(self, device: torch.device):
        self._handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._start = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except Exception:  # no pynvml, no driver support, MIG slice...: energy stays unknown
            self._handle = None

    def joules(self) -> float | None:
        if self._handle is None:
            return None
        try:
            return (self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._start) / 1000.0
        except Exception:
            return None


class Meter:
    """One phase's ledger row while it runs. `tick(steps)` after each unit of work; the row
    is rewritten at most every FLUSH_S seconds (`flush()` forces it, e.g. at a checkpoint).

    `prior_hours` are what earlier segments of the same run (before a resume) already
    cost; projections count them."""

    def __init__(
        self, ledger: Ledger | None, row: dict[str, Any], device: torch.device, clock: Callable[[], float],
        prior_hours: float = 0.0,
    ):
        self.ledger, self.row, self.clock = ledger, row, clock
        self.kind = row["device_kind"]
        self.count = row["device_count"]
        self.steps_target = row["steps_target"]
        self.prior_hours = prior_hours
        self.steps = 0
        # what the row ends as when the phase returns normally (distill sets "interrupted"
        # after a graceful Ctrl-C stop)
        self.final_status = "done"
        self.t0 = clock()
        self._first_step_s: float | None = None
        self._last_flush = self.t0
        self._energy = _Energy(device)
        self.row_id: int | None = None
        self._warned = False
        if ledger is not None:
            self._write(lambda: setattr(self, "row_id", ledger.insert(**row)))

    @property
    def wall_s(self) -> float:
        return self.clock() - self.t0

    @property
    def hours(self) -> float:
        """Device-hours of this segment."""
        return self.wall_s * self.count / 3600.0

    @property
    def unit(self) -> str:
        return hours_unit(self.kind)

    def tick(self, steps: int = 1) -> None:
        self.steps += steps
        if self._first_step_s is None:
            self._first_step_s = self.wall_s
        if self.clock() - self._last_flush >= FLUSH_S:
            self.flush()

    def projected_hours(self, total_steps: int, done_steps: int) -> float | None:
        """Device-hours the whole run will have cost at `total_steps`, now at `done_steps`:
        what was spent so far (earlier segments included) plus the remaining steps at this
        segment's rate. The first step is left out of the rate: it pays for allocator
        warm-up, cuDNN autotuning and Triton compilation."""
        if self.steps == 0:
            return None
        elapsed = self.wall_s
        if self.steps >= 2 and self._first_step_s is not None:
            per_step = (elapsed - self._first_step_s) / (self.steps - 1)
        else:
            per_step = elapsed / self.steps
        left = max(total_steps - done_steps, 0)
        return self.prior_hours + self.hours + left * per_step * self.count / 3600.0

    def budget_text(self, dataset: str, total_steps: int, done_steps: int) -> str:
        """'0.40 GPU-h, proj 1.70 GPU-h / paper 20 GPU-h' for the progress bar. CPU time is
        shown as CPU-h: it is never compared as if it were GPU time."""
        text = f"{_fmt_h(self.prior_hours + self.hours)} {self.unit}"
        proj = self.projected_hours(total_steps, done_steps)
        if proj is not None:
            text += f", proj {_fmt_h(proj)} {self.unit}"
        paper = PAPER_BUDGETS.get(dataset)
        if paper is not None:
            text += f" / paper {paper.gpu_hours:g} GPU-h"
            if paper.steps != total_steps:
                text += f"@{paper.steps}"
        return text

    def flush(self, status: str = "running") -> None:
        now = self.clock()
        self._last_flush = now
        wall = now - self.t0
        values = {
            "updated": time.time(), "wall_s": wall, "device_hours": wall * self.count / 3600.0,
            "steps": self.steps, "status": status,
        }
        joules = self._energy.joules()
        if joules is not None:
            values["energy_j"] = joules
        book, row_id = self.ledger, self.row_id
        if book is not None and row_id is not None:
            self._write(lambda: book.update(row_id, **values))

    def _write(self, fn: Callable[[], None]) -> None:
        if self.ledger is None:
            return
        try:
            fn()
        except (sqlite3.Error, OSError, D3FastError) as e:
            if not self._warned:
                self._warned = True
                # one plain line: a Python warning would print its source line as well
                tqdm.write(f"warning: d3fast ledger: not recorded ({e}); the run itself is unaffected", file=sys.stderr)




@contextmanager
def track(
    phase: str, dataset: str, preset: str, device: torch.device, *, steps_target: int | None = None,
    run: str | None = None, clock: Callable[[], float] = time.monotonic, ledger: Ledger | None = None,
    prior_hours: float = 0.0, devices: int = 1, record: bool = True,
) -> Iterator[Meter]:
    """Record a phase in the ledger: `with track("distill", ...) as meter: ... meter.tick()`.

    Ends the row as done, interrupted (Ctrl-C / SIGTERM) or failed (an exception). A resumed
    run's earlier segments (same `run`) are summed into the meter's prior hours, or
    `prior_hours` (what the run's own record holds) when that is more: a run copied to
    another path, or a ledger turned off or lost, keeps its hours.
    `devices`: how many devices the phase holds (the ranks of a distributed run: hours are
    wall time x devices). `record=False` (the ranks other than 0) or `D3FAST_LEDGER=0` turn
    recording off (projections still work)."""
    from d3fast.runtime import device_name

    if os.environ.get("D3FAST_LEDGER", "1") == "0" or not record:
        book = None
    else:
        book = ledger or Ledger()
    if book is not None and run is not None:
        try:
            earlier = [r for r in book.records(run=run) if r["phase"] == phase]
        except (sqlite3.Error, D3FastError):
            earlier = []
        prior_hours = max(prior_hours, sum(r["device_hours"] for r in earlier))
    row = {
        "started": time.time(), "updated": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
        "phase": phase, "dataset": dataset, "preset": preset or "", "run": run,
        "device_kind": "cuda" if device.type == "cuda" else "cpu", "device_name": device_name(device),
        "device_count": devices, "steps_target": steps_target, "status": "running",
    }
    meter = Meter(book, row, device, clock, prior_hours)
    try:
        yield meter
    except (KeyboardInterrupt, SystemExit):
        meter.flush("interrupted")
        raise
    except BaseException:
        meter.flush("failed")
        raise
    meter.flush(meter.final_status)


# ---- totals for `d3fast budget`


# what each column must hold: SQLite stores whatever it is given, and a hand-edited row (text in
# wall_s, a blob dataset, a pid past 64 bits) otherwise fails deep inside `budget`'s sums
_TEXT = ("host", "phase", "dataset", "preset", "device_kind", "device_name", "status")
_INT = ("id", "pid", "device_count", "steps")
_REAL = ("started", "updated", "wall_s", "device_hours")


def _bad_field(r: dict[str, Any]) -> str | None:
    def number(v: Any, kind: type | tuple[type, ...]) -> bool:
        if not isinstance(v, kind) or isinstance(v, bool) or not isinstance(v, int | float):
            return False
        return math.isfinite(v) and abs(v) < 2**62

    for k in _TEXT:
        if not isinstance(r.get(k), str):
            return f"{k} = {r.get(k)!r:.40}"
    for k in _INT:
        if not number(r.get(k), int):
            return f"{k} = {r.get(k)!r:.40}"
    for k in _REAL:
        if not number(r.get(k), (int, float)):
            return f"{k} = {r.get(k)!r:.40}"
    for k, kind in (("run", str), ("steps_target", int), ("energy_j", (int, float))):
        v = r.get(k)
        if v is not None and not (isinstance(v, str) if kind is str else number(v, kind)):
            return f"{k} = {v!r:.40}"
    return None


def measured_rate(phase: str, dataset: str, device_kind: str, path: Path | None = None) -> float | None:
    """Seconds per step (a distill step, an expert epoch) of `phase` on `dataset` and this
    kind of device, the median of the 20 latest records that ran a step; None without any, or
    without a readable ledger (a plan is a courtesy: it never stops a command)."""
    try:
        rows = Ledger(path).records(dataset=dataset)
    except D3FastError:
        return None
    rates = [r["wall_s"] / r["steps"] for r in rows if r["phase"] == phase and r["device_kind"] == device_kind
             and (r["steps"] or 0) > 0 and (r["wall_s"] or 0) > 0][-20:]
    return statistics.median(rates) if rates else None


def totals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, phase, device kind): runs, steps, wall, device-hours, energy, statuses."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in records:
        key = (r["dataset"], r["phase"], r["device_kind"])
        t = out.setdefault(key, {
            "dataset": key[0], "phase": key[1], "device_kind": key[2], "unit": hours_unit(key[2]),
            "records": 0, "steps": 0, "wall_s": 0.0, "device_hours": 0.0, "energy_kwh": None,
            "status": {}, "devices": set(),
        })
        t["records"] += 1
        t["steps"] += r["steps"]
        t["wall_s"] += r["wall_s"]
        t["device_hours"] += r["device_hours"]
        if r["energy_j"] is not None:
            t["energy_kwh"] = (t["energy_kwh"] or 0.0) + r["energy_j"] / 3.6e6
        t["status"][r["status"]] = t["status"].get(r["status"], 0) + 1
        t["devices"].add(r["device_name"])
    rows = sorted(out.values(), key=lambda t: (t["dataset"], _PHASE_ORDER.get(t["phase"], 9), t["device_kind"]))
    for t in rows:
        t["devices"] = sorted(t["devices"])
    return rows


_PHASE_ORDER = {"prepare": 0, "experts": 1, "distill": 2, "evaluate": 3, "profile": 4}


def paper_comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset with a paper budget and distill records: the distill rate measured here,
    projected to the paper's step count, next to the paper's GPU-hours."""
    out = []
    for t in rows:
        paper = PAPER_BUDGETS.get(t["dataset"])
        if paper is None or t["phase"] != "distill" or t["steps"] == 0:
            continue
        per_step = t["device_hours"] / t["steps"]
        out.append({
            "dataset": t["dataset"], "device_kind": t["device_kind"], "unit": t["unit"],
            "steps_done": t["steps"], "device_hours": t["device_hours"],
            "hours_per_1k_steps": per_step * 1000, "projected_paper_steps": per_step * paper.steps,
            "paper_gpu_hours": paper.gpu_hours, "paper_steps": paper.steps,
            # a CPU projection is not a GPU-hour figure: no ratio against the paper's GPUs
            "ratio_to_paper": per_step * paper.steps / paper.gpu_hours if t["device_kind"] == "cuda" else None,
        })
    return out


def budget_text(path: Path, rows: list[dict[str, Any]], show_records: bool = False) -> str:
    """`d3fast budget`'s report: totals per dataset, phase and device kind, the distill rate
    against the paper's budget, and optionally every row."""
    lines = [f"ledger: {path} ({len(rows)} record{'s' if len(rows) != 1 else ''})"]
    if not rows:
        return "\n".join(lines + ["nothing recorded yet: prepare, experts, distill, evaluate and profile add rows as they run"])
    sums = totals(rows)
    table = [["dataset", "phase", "device", "runs", "steps", "wall", "device-hours", "energy", "status"]]
    for t in sums:
        energy = f"{t['energy_kwh']:.2f} kWh" if t["energy_kwh"] is not None else "-"
        status = ", ".join(f"{k} {v}" for k, v in sorted(t["status"].items()))
        table.append([t["dataset"], t["phase"], "GPU" if t["device_kind"] == "cuda" else "CPU", str(t["records"]),
                      str(t["steps"]), _hms(t["wall_s"]), f"{_hours(t['device_hours'])} {t['unit']}", energy, status])
    lines.append(text_table(table))
    paper = paper_comparison(sums)
    if paper:
        lines.append("\nagainst the paper (distillation to convergence, docs/algorithm.md section 8):")
        for p in paper:
            line = (f"  {p['dataset']}: {p['hours_per_1k_steps']:.3f} {p['unit']} per 1k steps here -> "
                    f"{p['projected_paper_steps']:.2f} {p['unit']} for {p['paper_steps']} steps; "
                    f"paper {p['paper_gpu_hours']:g} GPU-h")
            if p["ratio_to_paper"] is not None:
                line += f" ({p['ratio_to_paper']:.2f}x the paper)"
            else:
                line += " (CPU time: not comparable to GPU-hours)"
            lines.append(line)
    if show_records:
        recs = [["id", "started", "phase", "dataset", "device", "steps", "wall", "status"]]
        for r in rows:
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"]))
            recs.append([str(r["id"]), started, r["phase"], r["dataset"], r["device_name"], str(r["steps"]),
                         _hms(r["wall_s"]), r["status"]])
        lines += ["", text_table(recs)]
    return "\n".join(lines)








def budget_json(path: Path, rows: list[dict[str, Any]], show_records: bool = False) -> dict[str, Any]:
    """`d3fast budget --json`: the totals per dataset and phase, the paper's budgets and the
    comparison (with `show_records`, every ledger row too)."""
    sums = totals(rows)
    out = {"ledger": str(path), "records": len(rows), "totals": sums, "paper": paper_comparison(sums),
           "paper_budgets": {k: vars(v) for k, v in PAPER_BUDGETS.items()}}
    if show_records:
        out["rows"] = rows
    return out
