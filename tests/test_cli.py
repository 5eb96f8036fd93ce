import json
import os

from click.testing import CliRunner

from d3fast.cli import cli
from tests._utils import make_imagenet_tree


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_and_doctor():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("prepare", "experts", "doctor", "config"):
        assert cmd in r.output
    r = run("doctor")
    assert r.exit_code == 0
    for key in ("torch", "d3fast._C", "kernels, cpu tensors", "loader ffcv", "d3fast home"):
        assert key in r.output


def test_prepare_and_config(tmp_path):
    make_imagenet_tree(tmp_path / "tree", n_train=1, n_val=1)
    r = run("prepare", "--dataset", "imagenette", "--data-path", str(tmp_path / "tree"))
    assert r.exit_code == 0, r.output
    assert "prepared imagenette: 10 train / 10 test images, 10 classes, 3x128x128" in r.output
    assert "decoded 20 images" in r.output
    r = run("prepare", "--dataset", "imagenette", "--data-path", str(tmp_path / "tree"))
    assert r.output.startswith("reused cache of imagenette")
    r = run("config", "--dataset", "digits", "--set", "experts.lr=0.5")
    assert json.loads(r.output)["experts"]["lr"] == 0.5


def test_errors_exit_2_with_one_line():
    for args, text in [
        (("prepare", "--dataset", "mnist9"), "unknown dataset 'mnist9'"),
        (("prepare", "--dataset", "imagenette", "--data-path", "/no/such/dir"), "does not exist"),
        (("config", "--dataset", "digits", "--set", "experts.bogus=1"), "unknown config key"),
        (("experts", "--dataset", "digits", "--no-auto"), "is not prepared"),
    ]:
        r = CliRunner().invoke(cli, list(args))
        assert r.exit_code == 2, (args, r.output)
        assert "error: " in r.output and text in r.output
        assert "Traceback" not in r.output


def test_experts_command_prepares_first():
    r = run("experts", "--dataset", "digits", "--num-experts", "1", "--epochs", "1", "--set", "net.width=8", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "digits is not prepared yet: preparing it first" in r.output
    assert "1/1 experts complete" in r.output and "train img/s" in r.output


def test_python_dash_m_and_version():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "d3fast", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "0.1.0" in out.stdout


def test_stale_temporaries_are_removed(d3fast_home):
    """Only temporaries whose writer has ended go: a live writer's stay, and so do those of
    a writer on another host sharing the directory (its pid means nothing here)."""
    from d3fast.io import atomic_path, owner_tag, remove_stale_temps, temp_dir

    host = owner_tag().split("-")[0]
    folder = d3fast_home / "data"
    folder.mkdir(parents=True)
    dead = [f"digits.tmp-{host}-999999999", ".expert_0001.safetensors." + f"{host}-999999999.abc123.tmp"]
    other_host = [f"digits.tmp-00000000-{os.getpid()}", ".e.safetensors.00000000-999999999.x1.tmp"]
    live = [temp_dir(folder / "digits").name]
    for name in dead + other_host + live:
        (folder / name).mkdir() if ".tmp-" in name else (folder / name).write_bytes(b"torn")
    with atomic_path(folder / "f.json") as tmp:
        tmp.write_text("{}")
        remove_stale_temps(folder)  # this very write's temporary survives
        assert tmp.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(other_host + live + ["f.json"])


def test_atomic_writes_respect_umask(tmp_path):
    import os

    from d3fast.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644


def test_progress_off_a_terminal_is_plain_lines(monkeypatch):
    import io

    from d3fast.progress import bar

    monkeypatch.setenv("D3FAST_PROGRESS_EVERY", "0")
    out = io.StringIO()  # not a terminal
    b = bar(total=3, desc="distill", file=out)
    for _ in range(3):
        b.update(1)
    b.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) >= 3 and all(line.startswith("distill:") for line in lines)
    assert "3/3" in lines[-1]
    monkeypatch.setenv("D3FAST_QUIET", "1")
    quiet = io.StringIO()
    b = bar(total=3, desc="distill", file=quiet)
    b.update(3)
    b.close()
    assert quiet.getvalue() == ""


def test_distill_without_a_dataset_names_what_it_uses(home, tmp_path):
    r = CliRunner().invoke(cli, ["distill", "--runs-dir", str(tmp_path), "--no-auto", "--device", "cpu",
                                 "--set", "experts.num_experts=99"])
    assert r.output.startswith("dataset digits (preset digits; --dataset or --preset picks another"), r.output
    r = CliRunner().invoke(cli, ["distill", "--preset", "cifar10", "--runs-dir", str(tmp_path), "--no-auto"])
    assert r.output.startswith("dataset cifar10 (preset cifar10)") and r.exit_code == 2  # then: not prepared


def test_every_command_handler_is_a_few_lines():
    """cli.py is a table of commands: a handler body longer than 15 lines is work that belongs
    in a recipe (d3fast/recipes/, CONTRIBUTING.md "Layout")."""
    import ast
    import inspect

    import d3fast.cli as cli_mod

    tree = ast.parse(inspect.getsource(cli_mod))
    handlers = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name != "cli"  # the root group
                and any(".command(" in ast.unparse(d) or ".group(" in ast.unparse(d) for d in n.decorator_list)]

    def commands(group):  # every command, those of a group (experts import, export) included
        for c in group.commands.values():
            yield c
            yield from commands(c) if hasattr(c, "commands") else ()

    assert len(handlers) == len(list(commands(cli)))
    long = {}
    for n in handlers:
        body = n.body[1:] if isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant) else n.body
        if body[-1].end_lineno - body[0].lineno + 1 > 15:
            long[n.name] = body[-1].end_lineno - body[0].lineno + 1
    assert not long, f"handlers longer than 15 lines: {long}"


def test_a_warning_reaches_the_terminal_as_one_line(monkeypatch):
    """A library warning (say, distill.compile falling back to eager) prints one `warning:`
    line, not Python's two lines with a file path and a line of d3fast's source."""
    import warnings

    import d3fast.config

    to_dict = d3fast.config.to_dict

    def warn_then(cfg):
        warnings.warn("distill.compile: compiling the decoder failed (no compiler); running it eagerly", stacklevel=2)
        return to_dict(cfg)

    monkeypatch.setattr(d3fast.config, "to_dict", warn_then)
    res = CliRunner().invoke(cli, ["config", "--dataset", "digits"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if "eagerly" in ln]
    assert lines == ["warning: distill.compile: compiling the decoder failed (no compiler); running it eagerly"]
    assert ".py:" not in res.stderr
