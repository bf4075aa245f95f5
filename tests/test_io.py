"""io: loading models with one clear error for every way a file is wrong,
and atomic writes; on every backend."""

import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

import renorm_convert as rc
from renorm_convert import io
from helpers import numpy, randomize_statistics, sample_inputs


def small_model():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    randomize_statistics(model, seed=1)
    return model


@keras.saving.register_keras_serializable(package="test_io")
class Doubler(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x


class Unregistered(keras.layers.Layer):
    def call(self, x):
        return x + 1.0


# --- what check_model_file refuses before loading anything -------------------


def test_paths_that_are_not_model_files(tmp_path):
    with pytest.raises(io.RenormConvertError, match="missing.keras: no such file"):
        rc.load(tmp_path / "missing.keras")
    with pytest.raises(io.RenormConvertError, match="is a directory; give a .keras"):
        rc.load(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(io.RenormConvertError, match=r"not a Keras model file; "
                       r"expected a name ending in \.keras, \.h5, \.hdf5"):
        rc.load(notes)
    fake = tmp_path / "fake.keras"
    fake.write_text("hello")
    with pytest.raises(io.RenormConvertError, match="not a valid .keras file"):
        rc.load(fake)


def test_a_text_file_named_h5_is_not_an_hdf5_file(tmp_path):
    for name in ("fake.h5", "FAKE.HDF5"):
        path = tmp_path / name
        path.write_text("model weights, honestly\n")
        with pytest.raises(io.RenormConvertError, match="not an HDF5 file") as info:
            rc.load(path)
        assert str(info.value).startswith(f"{path}: ")
        # The same refusal without loading anything (the command line's
        # check before a backend loads).
        with pytest.raises(io.RenormConvertError, match="not an HDF5 file"):
            io.check_model_file(path)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(io.RenormConvertError, match="not an HDF5 file"):
        rc.load(empty)


def test_a_truncated_hdf5_file_says_truncated_or_corrupted(tmp_path):
    model = small_model()
    whole = tmp_path / "whole.h5"
    model.save(whole)
    payload = whole.read_bytes()
    assert payload.startswith(b"\x89HDF\r\n\x1a\n")
    for keep in (len(payload) // 2, 4096):
        cut = tmp_path / f"cut{keep}.h5"
        cut.write_bytes(payload[:keep])
        io.check_model_file(cut)  # the signature is there
        with pytest.raises(io.RenormConvertError, match="cannot be read as a Keras "
                           r"model \(truncated or corrupted file") as info:
            rc.load(cut)
        assert str(info.value).startswith(f"{cut}: ")
        assert "\n" not in str(info.value)
    # The whole file loads, with the same outputs.
    loaded = rc.load(whole)
    x = sample_inputs(model)
    np.testing.assert_allclose(numpy(loaded(x)), numpy(model(x)), rtol=1e-6,
                               atol=1e-6)


def test_a_truncated_or_gutted_keras_file(tmp_path):
    model = small_model()
    whole = tmp_path / "whole.keras"
    model.save(whole)
    cut = tmp_path / "cut.keras"
    cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    with pytest.raises(io.RenormConvertError, match="not a valid .keras file .* or "
                       "is truncated"):
        rc.load(cut)
    # A zip archive that is not a Keras model.
    gutted = tmp_path / "gutted.keras"
    with zipfile.ZipFile(gutted, "w") as z:
        z.writestr("readme.txt", "nothing here")
    with pytest.raises(io.RenormConvertError, match=f"^{gutted}: cannot be "):
        rc.load(gutted)


# --- what only loading can tell ---------------------------------------------


def test_converted_model_loads_back_with_the_same_outputs(tmp_path):
    model = rc.convert(small_model(), r_max=2.0, d_max=1.0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = rc.load(path)
    layer = loaded.get_layer("bn")
    assert isinstance(layer, rc.BatchRenormalization)
    assert (layer.r_max, layer.d_max) == (2.0, 1.0)
    x = sample_inputs(model)
    np.testing.assert_allclose(numpy(loaded(x)), numpy(model(x)), rtol=1e-6,
                               atol=1e-6)
    for a, b in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(numpy(a), numpy(b))


def test_an_unregistered_class_says_how_to_pass_it(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, Unregistered(name="plus")(
        keras.layers.Dense(2)(inputs)))
    path = tmp_path / "custom.keras"
    model.save(path)
    with pytest.raises(io.RenormConvertError, match="uses the class 'Unregistered', "
                       "which is not registered. Pass custom_objects="):
        rc.load(path)
    loaded = rc.load(path, custom_objects={"Unregistered": Unregistered})
    x = sample_inputs(model)
    np.testing.assert_allclose(numpy(loaded(x)), numpy(model(x)), rtol=1e-6)


def test_a_registered_custom_layer_loads(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, Doubler()(keras.layers.Dense(3)(inputs)))
    model.save(tmp_path / "d.keras")
    loaded = rc.load(tmp_path / "d.keras")
    x = sample_inputs(model)
    np.testing.assert_allclose(numpy(loaded(x)), 2 * numpy(
        model.layers[1](x)), rtol=1e-6)


def test_lambda_is_refused_in_safe_mode_and_loads_unsafe(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 3.0)(
        keras.layers.Dense(3)(inputs)))
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(io.RenormConvertError, match="Lambda layer .* refused in safe "
                       "mode. Load it with safe_mode=False"):
        rc.load(path)
    loaded = rc.load(path, safe_mode=False)
    x = sample_inputs(model)
    np.testing.assert_allclose(numpy(loaded(x)), 3 * numpy(
        model.layers[1](x)), rtol=1e-6)


# --- atomic writes -----------------------------------------------------------


def _ours(directory):
    return [n for n in os.listdir(directory) if n.startswith(io.TEMP_PREFIX)]


def test_write_atomically_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "out.bin"
    io.write_atomically(path, b"first")
    assert path.read_bytes() == b"first"
    io.write_atomically(path, b"second, longer")
    assert path.read_bytes() == b"second, longer"
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask

    def half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        io.replace_atomically(path, half_then_fail)
    assert path.read_bytes() == b"second, longer"
    assert _ours(tmp_path) == []

    def interrupted(tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.replace_atomically(path, interrupted)
    assert path.read_bytes() == b"second, longer" and _ours(tmp_path) == []


def test_an_os_error_names_the_target_not_the_temporary(tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "out.bin"
    with pytest.raises(OSError) as info:
        io.write_atomically(missing, b"x")
    assert str(missing) in str(info.value)
    assert io.TEMP_PREFIX not in str(info.value)


def test_save_atomically_writes_a_model_that_loads(tmp_path):
    model = small_model()
    path = tmp_path / "m.keras"
    path.write_bytes(b"an old file")
    io.save_atomically(model, path)
    assert _ours(tmp_path) == []
    x = sample_inputs(model)
    np.testing.assert_allclose(numpy(rc.load(path)(x)), numpy(model(x)),
                               rtol=1e-6, atol=1e-6)


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; "
                           "print(os.getpid())"], capture_output=True,
                          text=True)
    dead = int(done.stdout)
    names = {
        "dead": f"{io.TEMP_PREFIX}{dead}-abc.keras",
        "alive": f"{io.TEMP_PREFIX}{os.getpid()}-def.keras",
        "old": f"{io.TEMP_PREFIX}{os.getpid()}-ghi.keras",
        "other": ".tmp-someone-else-123-x.keras",
        "model": "model.keras",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    day_ago = os.path.getmtime(tmp_path / names["old"]) - io.STALE_AFTER_S - 60
    os.utime(tmp_path / names["old"], (day_ago, day_ago))
    removed = io.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([names["dead"], names["old"]])
    assert sorted(os.listdir(tmp_path)) == sorted(
        [names["alive"], names["other"], names["model"]])
    assert io.remove_stale_temporaries(tmp_path / "missing") == []


def _scaled_mean(t):
    """A helper of this module that a Keras 3 Lambda calls."""
    return keras.ops.mean(t, axis=-1, keepdims=True) * _SCALE


_SCALE = 0.5


def test_keras3_lambda_calling_its_module_helper_reloads(tmp_path):
    """Keras 3 saves a lambda as code and recreates it with Keras's own
    globals; `load` gives it those of the module it was compiled in."""
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Lambda(lambda t: t * _scaled_mean(t), name="gate")(x)
    model = keras.Model(inputs, x)
    randomize_statistics(model, seed=3)
    converted = rc.convert(model)
    x = np.random.default_rng(1).normal(size=(2, 6, 6, 3)).astype("float32")
    expected = numpy(model(x, training=False))
    converted.save(tmp_path / "c.keras")
    with pytest.raises(Exception, match="Lambda"):  # NameError within
        keras.models.load_model(tmp_path / "c.keras", safe_mode=False)
    loaded = io.load(tmp_path / "c.keras", safe_mode=False)
    assert isinstance(loaded.get_layer("bn"), rc.BatchRenormalization)
    np.testing.assert_allclose(numpy(loaded(x, training=False)), expected,
                               rtol=1e-5, atol=1e-6)



LIBRARY = """
import keras


def halve(t):
    return t * 0.5


def model():
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Lambda(
        lambda t: halve(t), name="halve")(inputs))
"""


def test_a_lambda_of_a_library_module_reloads_while_it_is_importable(
        tmp_path):
    """A Lambda written in a library's module, calling that module's
    helper: it loads while the module can be imported (imported already or
    not), and otherwise is
    refused in one line that says what to do (not Keras's guess about
    output shapes)."""
    (tmp_path / "zoo_library.py").write_text(LIBRARY)
    sys.path.insert(0, str(tmp_path))
    try:
        import zoo_library

        zoo_library.model().save(tmp_path / "m.keras")
        x = np.ones((2, 4), "float32")
        loaded = io.load(tmp_path / "m.keras", safe_mode=False)
        np.testing.assert_allclose(numpy(loaded(x)), 0.5 * x)
        # Importable but not imported yet (a new process): found on
        # sys.path from the code's file name.
        sys.modules.pop("zoo_library")
        loaded = io.load(tmp_path / "m.keras", safe_mode=False)
        np.testing.assert_allclose(numpy(loaded(x)), 0.5 * x)
        assert "zoo_library" in sys.modules
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("zoo_library", None)
    with pytest.raises(io.RenormConvertError,
                       match="Lambda layer's code fails.*importable"):
        io.load(tmp_path / "m.keras", safe_mode=False)
