"""Every command and code example README.md shows runs (at a small scale)."""

import os
import re
import shlex

import pytest

from renorm_convert.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# Extra arguments that shrink a long command to test size.
SMALL = {
    "demo": ["--train-size", "256", "--val-size", "200", "--epochs", "1"],
    "finetune": ["--train-size", "256", "--val-size", "200"],
    "reproduce": ["--steps", "40", "--seeds", "1", "--eval-every", "20"],
}


def _blocks(language):
    text = open(README).read()
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def _commands():
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith(("renorm-convert ",
                                    ".venv/bin/renorm-convert ")):
                    commands.append(part.split("renorm-convert ", 1)[1])
    return commands


def test_readme_shows_the_two_setup_commands():
    first = _blocks("bash")[0]
    lines = [l for l in first.splitlines() if l and not l.startswith("#")]
    assert lines == [
        "bash scripts/setup.sh && .venv/bin/renorm-convert demo",
        "bash scripts/test.sh",
    ]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "bash scripts/test.sh" in ci
    script = open(os.path.join(ROOT, "scripts", "test.sh")).read()
    assert 'BACKENDS="${BACKENDS:-tensorflow jax torch}"' in script


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    os.symlink(os.path.join(ROOT, "renorm_convert"), tmp_path / "renorm_convert")
    os.mkdir(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_every_readme_command_runs(workdir, capsys):
    commands = _commands()
    names = [c.split()[0] for c in commands]
    assert {"inspect", "convert", "finetune", "export", "revert", "demo",
            "reproduce"} <= set(names)
    for command in commands:
        argv = shlex.split(command)
        argv += SMALL.get(argv[0], [])
        if argv[0] == "demo":
            argv += ["--out", str(workdir / "demo")]
        if "--strategy" in argv and "multi-worker" in argv:
            continue  # two machines: test_multi_worker_two_processes
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, f"renorm-convert {command}\n{out}\n{err}"
    assert (workdir / "runs" / "tuned.onnx").exists()
    assert (workdir / "runs" / "figures" / "non_iid.png").exists()
    assert (workdir / "demo" / "finetuned.onnx").exists()


@pytest.mark.slow
def rc_plan_length(namespace):
    return len(namespace["rc"].convert_plan(namespace["model"]))


def test_readme_python_examples_run(workdir):
    blocks = [b for b in _blocks("python") if "import renorm_convert" in b
              or "model.fit(" in b]
    first, fit = blocks[0], next(b for b in blocks if "model.fit(" in b)
    assert "rc.convert_plan(model)" in first and "verify=x" in first
    namespace = {}
    code = first.replace("train=4096, val=1000", "train=256, val=200")
    exec(compile(code, "README.md", "exec"), namespace)
    report, result = namespace["report"], namespace["result"]
    # Verified on real images, on the logits: a number that means something
    # (random inputs saturate the softmax; its outputs then agree to 1e-30).
    assert report.folded == 19
    assert 0 < report.verification.logits_relative_diff <= 1e-4
    assert report.verification.accuracy > 0.5
    assert result.final_bounds == (3.0, 5.0)
    assert rc_plan_length(namespace) == 19
    # The same pieces in a plain model.fit.
    exec(compile(fit, "README.md", "exec"), namespace)
    model = namespace["model"]
    import renorm_convert as rc
    assert {(l.r_max, l.d_max) for l in rc.renorm_layers(model)} == {(3.0, 5.0)}
    with open(workdir / "runs" / "fit.history.csv") as f:
        assert len(f.read().splitlines()) == 3  # a header and two epochs
    assert (workdir / "runs" / "fit.png").exists()
