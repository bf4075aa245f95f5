"""The command line: every subcommand, and one-line errors with exit 2."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import renorm_convert as rc
from helpers import nested_model, numpy, randomize_statistics
from renorm_convert.cli import main


@pytest.fixture
def model_file(tmp_path):
    model = nested_model()
    randomize_statistics(model, seed=1)
    path = tmp_path / "model.keras"
    model.save(path)
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json(model_file, capsys):
    code, out, _ = _run(capsys, "inspect", model_file, "--json")
    assert code == 0
    data = json.loads(out)
    paths = {row["path"]: row for row in data["layers"]}
    assert set(paths) == {"inner/inner_bn", "shared_bn", "join_bn",
                          "seq/seq_bn", "seq/seq_bn2"}
    assert paths["inner/inner_bn"]["producer"] == "inner/inner_conv"
    assert paths["inner/inner_bn"]["foldable"]
    assert paths["join_bn"]["channels"] == 8
    assert not paths["join_bn"]["foldable"]
    assert data["totals"]["foldable"] == 3
    code, out, _ = _run(capsys, "inspect", model_file)
    assert code == 0 and "5 normalization layers" in out


def test_inspect_says_where_each_normalization_folds(tmp_path, capsys):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="producer")(inputs)
    x = keras.layers.BatchNormalization(name="bn_back")(x)
    x = keras.layers.Concatenate()([x, inputs])
    x = keras.layers.BatchNormalization(name="bn_forward")(x)
    a = keras.layers.Conv2D(2, 1, name="left")(x)
    b = keras.layers.Conv2D(2, 3, name="right")(x)
    path = tmp_path / "m.keras"
    keras.Model(inputs, [a, b]).save(path)
    code, out, _ = _run(capsys, "inspect", path, "--json")
    rows = {r["path"]: r for r in json.loads(out)["layers"]}
    assert rows["bn_back"]["into"] == "producer"
    assert rows["bn_forward"]["into"] == "consumers"
    assert sorted(rows["bn_forward"]["consumers"]) == ["left", "right"]
    code, out, _ = _run(capsys, "inspect", path)
    line = next(l for l in out.splitlines() if l.startswith("bn_forward"))
    assert line.endswith(("yes, forward into left, right",
                          "yes, forward into right, left")), line


def test_convert_revert_export(model_file, tmp_path, capsys):
    out_path = tmp_path / "renorm.keras"
    code, out, _ = _run(capsys, "convert", model_file, "-o", out_path,
                        "--r-max", "2", "--microbatch", "4")
    assert code == 0, out
    assert "converted 5 BatchNormalization" in out
    assert "inference parity" in out
    converted = keras.models.load_model(out_path)
    layer = converted.get_layer("join_bn")
    assert isinstance(layer, rc.BatchRenormalization)
    assert (layer.r_max, layer.microbatch_size) == (2.0, 4)
    original = keras.models.load_model(model_file)
    x = [np.ones((2, 8, 8, 3), "float32")] * 2
    for a, b in zip(original(x), converted(x)):
        np.testing.assert_allclose(numpy(a), numpy(b), rtol=1e-5, atol=1e-6)

    back = tmp_path / "back.keras"
    code, out, _ = _run(capsys, "revert", out_path, "-o", back)
    assert code == 0 and "reverted 5 layers" in out
    reverted = keras.models.load_model(back)
    assert not rc.renorm_layers(reverted)
    for a, b in zip(original(x), reverted(x)):
        np.testing.assert_allclose(numpy(a), numpy(b), rtol=1e-5, atol=1e-6)

    onnx_path = tmp_path / "model.onnx"
    if keras.backend.backend() == "jax":
        # JAX exports through the saved file, elsewhere: refused in one
        # line that says how, nothing written.
        _one_line_error(capsys, ["export", out_path, "-o", onnx_path],
                        "KERAS_BACKEND=torch")
        assert not onnx_path.exists()
        return
    code, out, _ = _run(capsys, "export", out_path, "-o", onnx_path)
    assert code == 0, out
    assert "folded 3 normalization layers" in out
    assert "onnxruntime vs Keras" in out
    assert onnx_path.exists()


def _one_line_error(capsys, argv, match):
    code, out, err = _run(capsys, *argv)
    assert code == 2, (out, err)
    lines = [l for l in err.splitlines() if not l.startswith("[renorm")]
    assert len(lines) == 1, err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err


def _file(name, content):
    """Writes `content` (bytes, or a function of the good model file's
    bytes) to tmp_path/name; returns the path."""
    def make(tmp_path, model_file):
        data = content(model_file.read_bytes()) if callable(content) \
            else content
        (tmp_path / name).write_bytes(data)
        return tmp_path / name
    return make


def _plain_model(tmp_path, model_file):
    path = tmp_path / "plain.keras"
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(path)
    return path


def _given(tmp_path, model_file):
    return model_file


# (what, the input model, extra arguments, the line's telling part)
BAD_INPUTS = [
    ("missing file", lambda t, m: t / "missing.keras", [],
     "no such file; check the path"),
    ("a text file", _file("notes.txt", b"hello"), [], "not a Keras model"),
    ("a truncated .keras", _file("truncated.keras", lambda b: b[:2000]), [],
     "truncated"),
    ("an HDF5 file of nothing", _file(
        "fake.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 100), ["inspect"],
     "corrupted"),
    ("a text file named .h5", _file("text.h5", b"just some text"),
     ["inspect"], "not an HDF5 file"),
    ("the output is the input", _given, ["-o", "MODEL"],
     "is the input file"),
    ("the output's folder is missing", _given,
     ["-o", "TMP/nodir/x.keras"], "does not exist"),
    ("r_max below 1", _given, ["--r-max", "0.5"], "Received: --r-max 0.5"),
    ("no BatchNormalization", _plain_model, [], "no BatchNormalization"),
]


@pytest.mark.parametrize("what, make, extra, match", BAD_INPUTS,
                         ids=[case[0] for case in BAD_INPUTS])
def test_a_bad_input_is_one_line_and_nothing_written(
        what, make, extra, match, model_file, tmp_path, capsys):
    model = make(tmp_path, model_file)
    if extra[:1] == ["inspect"]:
        argv = ["inspect", model]
    else:
        argv = ["convert", model] + [
            str(model) if a == "MODEL" else a.replace("TMP", str(tmp_path))
            for a in extra]
        if "-o" not in extra:
            argv += ["-o", tmp_path / "out.keras"]
    before = sorted(os.listdir(tmp_path))
    _one_line_error(capsys, argv, match)
    assert sorted(os.listdir(tmp_path)) == before


@keras.saving.register_keras_serializable(package="cli_test")
class Doubler(keras.layers.Layer):
    def call(self, x):
        return 2 * x


def test_unknown_custom_layer_and_lambda(tmp_path, capsys):
    inputs = keras.Input((3,))
    x = keras.layers.BatchNormalization()(Doubler()(inputs))
    path = tmp_path / "custom.keras"
    keras.Model(inputs, x).save(path)
    keras.saving.get_custom_objects().pop("cli_test>Doubler")
    _one_line_error(capsys, ["inspect", path],
                    "uses the class 'Doubler', which is not registered. Pass "
                    "--custom-objects")
    keras.saving.get_custom_objects()["cli_test>Doubler"] = Doubler

    inputs = keras.Input((3,))
    x = keras.layers.Lambda(lambda t: t + 1)(inputs)
    x = keras.layers.BatchNormalization()(x)
    lam = tmp_path / "lambda.keras"
    keras.Model(inputs, x).save(lam)
    _one_line_error(capsys, ["inspect", lam], "--unsafe")
    code, out, err = _run(capsys, "convert", lam, "-o",
                          tmp_path / "lam_out.keras", "--unsafe")
    assert code == 0 and "warning: --unsafe" in err


def test_help_explains_each_command():
    """Every command's --help: its usage, a description that starts at the
    margin, and every one of its options."""
    from renorm_convert.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions
               if isinstance(a, __import__("argparse")._SubParsersAction))
    assert sorted(sub.choices) == sorted(COMMANDS)
    for command in COMMANDS:
        result = subprocess.run(
            [sys.executable, "-m", "renorm_convert", command, "--help"],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        text = result.stdout
        assert text.startswith("usage: renorm-convert " + command), text
        description = text.split("\n\n")[1]
        assert description and not description[0].isspace(), description
        for action in sub.choices[command]._actions:
            for flag in action.option_strings:
                assert flag in text, (command, flag)


def test_finetune_bad_inputs(tmp_path, capsys):
    model = rc.convert(keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3),
        keras.layers.BatchNormalization(), keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax")]))
    path = tmp_path / "m.keras"
    model.save(path)
    out = tmp_path / "out.keras"
    base = ["finetune", path, "-o", out]
    _one_line_error(capsys, base + ["--data", "imagenet"],
                    "unknown data source")
    _one_line_error(capsys, base + ["--data", "digits", "--non-iid", "3",
                                    "--batch-size", "32"], "multiple")
    _one_line_error(capsys, base + ["--data", "digits"], "--head 10")
    flat = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2),
                             keras.layers.BatchNormalization()])
    flat_path = tmp_path / "flat.keras"
    flat.save(flat_path)
    _one_line_error(capsys, ["finetune", flat_path, "-o", out, "--data",
                             "digits"], "image input")
    _one_line_error(capsys, base + ["--data", "digits", "--head", "10",
                                    "--optimizer", "nope"],
                    "--optimizer 'nope': use a Keras optimizer")
    assert not out.exists()


def _digits_classifier(tmp_path):
    """A converted 10-class classifier of 8x8 images, saved: (model, path)."""
    model = rc.convert(keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3),
        keras.layers.BatchNormalization(), keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax")]))
    path = tmp_path / "m.keras"
    model.save(path)
    return model, path


def test_finetune_command(tmp_path, capsys):
    _, path = _digits_classifier(tmp_path)
    out = tmp_path / "tuned.keras"
    code, stdout, err = _run(capsys, "finetune", path, "-o", out, "--data",
                             "digits", "--epochs", "2", "--microbatch", "4",
                             "--optimizer", "rmsprop", "--momentum", "0.9",
                             "--plot", tmp_path / "p.png", "--grad-report",
                             tmp_path / "g.json", "--quiet-progress")
    assert code == 0, err
    assert "validation accuracy on 359 validation images: before " in stdout
    assert "final r_max 3.00" in stdout
    assert "mean |gradient|: normalization" in stdout
    # The layer settings it trains with, before training.
    assert "training with: microbatch 4, momentum 0.9" in err
    tuned = keras.models.load_model(out)
    assert rc.renorm_layers(tuned)[0].microbatch_size == 4
    with open(tmp_path / "tuned.history.csv") as f:
        rows = f.read().splitlines()
    assert len(rows) == 3 and "val_accuracy" in rows[0]  # header + 2 epochs
    with open(tmp_path / "tuned.history.json") as f:
        record = json.load(f)
    assert len(record["epochs"]) == 2
    assert (tmp_path / "p.png").stat().st_size > 10_000
    gradients = json.load(open(tmp_path / "g.json"))
    assert gradients


def test_finetune_in_float16_scales_the_loss(tmp_path, capsys):
    """--mixed-precision float16: the layers compute in float16, the saved
    variables stay float32, and the run trains (loss scaling on)."""
    model, path = _digits_classifier(tmp_path)
    out = tmp_path / "half.keras"
    code, stdout, err = _run(capsys, "finetune", path, "-o", out, "--data",
                             "digits", "--train-size", "256", "--val-size",
                             "64", "--mixed-precision", "float16",
                             "--quiet-progress")
    assert code == 0, err
    assert "computing in float16" in err and "loss scaling on" in err
    tuned = keras.models.load_model(out)
    assert all(v.dtype == "float32" for v in tuned.variables)
    assert rc.renorm_layers(tuned)[0].compute_dtype == "float16"
    before = numpy(model.layers[0].kernel)
    assert not np.allclose(numpy(tuned.layers[0].kernel), before)


def test_custom_objects_module_registers_layers(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_layers.py").write_text(
        "import keras\n\n"
        "@keras.saving.register_keras_serializable(package='my_layers')\n"
        "class Halver(keras.layers.Layer):\n"
        "    def call(self, x):\n"
        "        return x / 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_layers

    inputs = keras.Input((3,))
    x = keras.layers.BatchNormalization(name="bn")(my_layers.Halver()(inputs))
    path = tmp_path / "halver.keras"
    keras.Model(inputs, x).save(path)
    keras.saving.get_custom_objects().pop("my_layers>Halver")
    _one_line_error(capsys, ["inspect", path], "'Halver'")
    code, out, err = _run(capsys, "convert", path, "-o",
                          tmp_path / "out.keras", "--custom-objects",
                          "my_layers")
    assert code == 0, err
    assert "converted 1 BatchNormalization" in out


@pytest.mark.tensorflow
def test_finetune_head_on_keras2_conv_classifier(tmp_path, capsys):
    """A Keras 2 .h5 classifier ending in Conv2D(classes, 1x1) ->
    GlobalAveragePooling2D -> softmax gets a 10-class head."""
    import tf_keras
    inputs = tf_keras.Input((8, 8, 1))
    x = tf_keras.layers.Conv2D(6, 3, use_bias=False)(inputs)
    x = tf_keras.layers.BatchNormalization()(x)
    x = tf_keras.layers.Activation("relu")(x)
    x = tf_keras.layers.Conv2D(4, 1, name="conv_classes")(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf_keras.layers.Activation("softmax")(x)
    path = tmp_path / "mini.h5"
    tf_keras.Model(inputs, outputs, name="model_1").save(path)
    out = tmp_path / "tuned.keras"
    code, stdout, err = _run(capsys, "finetune", path, "-o", out, "--data",
                             "digits", "--epochs", "1", "--head", "10",
                             "--train-size", "256", "--val-size", "64",
                             "--quiet-progress")
    assert code == 0, err
    tuned = keras.models.load_model(out)
    assert tuned.get_layer("conv_classes_head10").filters == 10
    assert [type(l).__name__ for l in tuned.layers[-2:]] == [
        "GlobalAveragePooling2D", "Activation"]
    probabilities = tuned(np.zeros((2, 8, 8, 1), "float32")).numpy()
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1, rtol=1e-5)


HELP_WITHOUT_TENSORFLOW = """
import sys
sys.argv[0] = "renorm-convert"
from renorm_convert.cli import main
for argv in (["--help"], ["finetune", "--help"], ["export", "--help"],
             ["finetune", "m.keras", "-o", "o.keras", "--epochs", "x"],
             ["export", "m.keras", "-o", "o.onnx", "--opset", "99"]):
    try:
        main(argv)
    except SystemExit:
        pass
print("tensorflow" in sys.modules, "keras" in sys.modules)
"""


def test_help_and_usage_errors_answer_before_tensorflow_loads():
    out = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TENSORFLOW],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False False", out.stderr
    assert "--epochs: expected an integer; got 'x'" in out.stderr
    assert "--opset: expected an opset from 9 to 18; got 99" in out.stderr
    # The installed command, timed: TensorFlow's import alone takes 5-10 s.
    command = os.path.join(os.path.dirname(sys.executable), "renorm-convert")
    if os.path.exists(command):
        import time
        start = time.perf_counter()
        subprocess.run([command, "export", "--help"], capture_output=True,
                       check=True, timeout=60)
        assert time.perf_counter() - start < 3.0


REFUSED_BEFORE_BACKEND = """
import sys
sys.argv[0] = "renorm-convert"
from renorm_convert.cli import main
code = main(sys.argv[1:])
print(code, "keras" in sys.modules)
"""
MODEL = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                     "renorm_convert", "reference", "inception_fmnist.keras")


@pytest.mark.parametrize("argv, match", [
    (["finetune", MODEL, "-o", "{tmp}/o.keras", "--data", "{tmp}/nope/"],
     "no such directory"),
    (["finetune", MODEL, "-o", "{tmp}/o.keras", "--data", "digits",
      "--non-iid", "3"], "--non-iid 3: the batch size 32"),
    (["finetune", MODEL, "-o", "{tmp}/o.keras", "--data", "digits",
      "--checkpoint-dir", "{tmp}/file"], "is a file, not a directory"),
    (["finetune", MODEL, "-o", "{tmp}/o.keras", "--data", "digits",
      "--strategy", "{other}"], "runs on Keras's"),
    (["export", MODEL, "-o", "{tmp}/o.onnx", "--int8", "--data",
      "{tmp}/nope/"], "no such directory"),
    (["demo", "--data", "{tmp}/nope.npz"], "nope.npz"),
    (["reproduce", "non-iid", "--classes-per-batch", "3"],
     "--classes-per-batch 3"),
    (["diagnose", MODEL, "--data", "digits", "--non-iid", "3"],
     "--non-iid 3: the batch size 32"),
    (["diagnose", MODEL, "--data", "{tmp}/nope/"], "no such directory"),
])
def test_refusals_come_before_the_backend_in_one_line(tmp_path, argv, match):
    # What the command checks itself is refused before Keras (and so
    # TensorFlow, with its native start-up lines on fd 2) is imported.
    (tmp_path / "file").write_text("x")
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    other = "data-parallel" if backend == "tensorflow" else "mirrored"
    argv = [a.format(tmp=tmp_path, other=other) for a in argv]
    out = subprocess.run([sys.executable, "-c", REFUSED_BEFORE_BACKEND]
                         + argv, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.stdout.split() == ["2", "False"], (out.stdout, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and match in lines[0], out.stderr
    assert lines[0].startswith(f"renorm-convert {argv[0]}: error: ")


def test_a_reader_that_stops_early_is_no_error(tmp_path):
    # `renorm-convert inspect MODEL | head -1`: the pipe closes before the
    # table is written; the command ends quietly (141, as Unix tools do).
    script = ("import sys\nfrom renorm_convert.cli import main\n"
              "sys.stderr.write(f'exit {main(sys.argv[1:])}\\n')\n")
    process = subprocess.Popen(
        [sys.executable, "-c", script, "inspect", MODEL],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path)
    process.stdout.close()
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert err.splitlines()[-1] == "exit 141", err
    assert "error" not in err and "Broken pipe" not in err, err


def test_an_error_after_the_backend_loads_is_one_line_too(tmp_path):
    # Labels are read once the backend is up: TensorFlow's native start-up
    # lines must not come with the refusal.
    y = np.zeros((20, 10), "float32")
    y[:, :2] = 1  # multi-hot
    np.savez(tmp_path / "multi.npz", x=np.zeros((20, 28, 28), "float32"),
             y=y)
    out = subprocess.run(
        [sys.executable, "-c", REFUSED_BEFORE_BACKEND, "finetune", MODEL,
         "-o", str(tmp_path / "o.keras"), "--data",
         f"npz:{tmp_path / 'multi.npz'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.stdout.split() == ["2", "True"], (out.stdout, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "multi-label" in lines[0], out.stderr


def test_every_option_explains_itself_with_its_default():
    from renorm_convert.cli import build_parser
    from renorm_convert.cli._args import Formatter as _Formatter
    parser = build_parser()
    sub = next(a for a in parser._actions
               if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, command in sub.choices.items():
        formatter = _Formatter(command.prog)
        for action in command._actions:
            text = formatter._get_help_string(action)
            assert text, f"{name} {action.option_strings or action.dest}"
            if action.option_strings and action.default not in (
                    None, False, "==SUPPRESS=="):
                assert "default" in text, (name, action.option_strings)
    # The command list: one line per command.
    lines = parser.format_help().splitlines()
    for name in sub.choices:
        line = next(l for l in lines if l.strip().startswith(name + " "))
        assert len(line.split()) > 1, line


# ONNX export runs on TensorFlow and PyTorch (JAX exports the saved file
# there).
EXPORTS = pytest.mark.skipif(keras.backend.backend() == "jax",
                             reason="export runs on TensorFlow and PyTorch")


@EXPORTS
def test_export_verifies_on_real_images(tmp_path, capsys):
    model = rc.convert(keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3),
        keras.layers.BatchNormalization(), keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax")]))
    randomize_statistics(model, seed=2)
    path = tmp_path / "m.keras"
    model.save(path)
    code, out, err = _run(capsys, "export", path, "-o", tmp_path / "m.onnx",
                          "--data", "digits", "--verify-size", "50")
    assert code == 0, err
    assert "on 50 given inputs" in out
    assert "logits before the final activation" in out
    assert "same top-1 on 100.0%" in out


@EXPORTS
def test_export_int8_and_float16_commands(tmp_path, capsys):
    model = rc.convert(keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")]))
    path = tmp_path / "m.keras"
    model.save(path)
    code, out, err = _run(capsys, "export", path, "-o", tmp_path / "q.onnx",
                          "--int8", "--data", "digits",
                          "--calibration-size", "100")
    assert code == 0, err
    assert "int8:" in out and "same top-1 as the float model" in out
    assert "accuracy: int8" in out
    code, out, err = _run(capsys, "export", path, "-o", tmp_path / "h.onnx",
                          "--float16")
    assert code == 0, err
    assert "float16 weights and compute" in out
    code, out, err = _run(capsys, "export", path, "-o", tmp_path / "x.onnx",
                          "--int8", "--float16")
    assert code == 2 and "not allowed with" in err
    assert not (tmp_path / "x.onnx").exists()


def test_the_backend_installed_is_taken_when_none_is_set(tmp_path):
    """No KERAS_BACKEND, and a keras.json naming TensorFlow (Keras writes it
    so on its first import): the command runs on the backend installed,
    and says so where that is not TensorFlow. A KERAS_BACKEND naming a
    backend that is not installed is refused in one line naming the one
    that is."""
    import importlib.util

    from helpers import subprocess_env

    home = tmp_path / "keras_home"
    home.mkdir()
    (home / "keras.json").write_text('{"backend": "tensorflow"}')
    path = tmp_path / "m.keras"
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2),
                      keras.layers.BatchNormalization()]).save(path)
    command = [sys.executable, "-m", "renorm_convert.cli", "inspect", path]
    backend = keras.backend.backend()
    ran = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env=subprocess_env(drop=("KERAS_BACKEND",),
                                            KERAS_HOME=str(home)))
    assert ran.returncode == 0, ran.stderr
    assert "1 normalization layers" in ran.stdout
    assert (f"Keras backend: {backend} (the one installed" in ran.stderr) == (
        backend != "tensorflow")
    missing = [b for b in ("jax", "torch", "tensorflow")
               if importlib.util.find_spec(b) is None]
    if missing:
        refused = subprocess.run(
            command, capture_output=True, text=True, timeout=300,
            env=subprocess_env(KERAS_BACKEND=missing[0],
                               KERAS_HOME=str(home)))
        assert refused.returncode == 2
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and f"set KERAS_BACKEND={backend}" in lines[0]
