"""Loading models with a clear error for every way a file can be wrong, and
atomic writes: a file is either its old self or the whole new one, and no
temporary file outlives its writer."""

import os
import re
import tempfile
import time
import zipfile

from renorm_convert.errors import RenormConvertError

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"




def check_model_file(path):
    """Refuses, without loading anything, a path that is not a model file:
    missing, a directory, another suffix, or contents of another kind."""
    path = str(path)
    if not os.path.exists(path):
        raise RenormConvertError(
            f"{path}: no such file; check the path (a .keras or Keras 2 .h5 "
            "model file).")
    if os.path.isdir(path):
        raise RenormConvertError(
            f"{path}: is a directory; give a .keras or .h5 model file "
            "(a SavedModel directory can be re-saved with "
            "model.save('m.keras')).")
    if not path.lower().endswith(MODEL_SUFFIXES):
        raise RenormConvertError(
            f"{path}: not a Keras model file; expected a name ending in "
            f"{', '.join(MODEL_SUFFIXES)}.")
    if path.lower().endswith(".keras") and not zipfile.is_zipfile(path):
        raise RenormConvertError(
            f"{path}: not a valid .keras file (a .keras file is a zip "
            "archive; this one is not, or is truncated). Save the model "
            "again with model.save().")
    if path.lower().endswith((".h5", ".hdf5")):
        with open(path, "rb") as f:
            head = f.read(8)
        if head != _HDF5_SIGNATURE:
            raise RenormConvertError(
                f"{path}: not an HDF5 file (a Keras 2 .h5 model starts with "
                "the HDF5 signature; this one does not). Give the model "
                "file itself.")


def load(path, *, safe_mode=True, custom_objects=None):
    """Loads a `.keras` or Keras-2 `.h5` model, with a one-line error
    for every way the file can be wrong."""
    import keras

    import renorm_convert
    from renorm_convert._internal import keras_hooks as internals
    from renorm_convert.io import keras2 as legacy

    renorm_convert.register()
    path = str(path)
    check_model_file(path)
    try:
        model = None
        if path.lower().endswith((".h5", ".hdf5")):
            model = legacy.load_h5(path, custom_objects, safe_mode)
        if model is None:
            # Lambda code (unsafe mode only) runs with its own module's
            # globals, as where it was written.
            with keras.saving.custom_object_scope(custom_objects or {}), \
                    internals.lambda_code_globals(legacy.lambda_globals):
                model = keras.models.load_model(path, compile=False,
                                                safe_mode=safe_mode)
    except RenormConvertError:
        raise
    except Exception as e:
        raise _explain_load_error(path, e) from None
    if not isinstance(model, keras.Model):
        raise RenormConvertError(
            f"{path}: holds a {type(model).__name__}, not a model.")
    return model


def _explain_load_error(path, error):
    text = " ".join(str(error).split())
    if "Lambda" in text and "safe_mode" in text:
        return RenormConvertError(
            f"{path}: has a Lambda layer whose Python code would run on "
            "loading; refused in safe mode. Load it with {fix} if you trust "
            "the file.", fix=("safe_mode", False))
    if "Lambda.call()" in text and "infer the shape" in text:
        return RenormConvertError(
            f"{path}: a Lambda layer's code fails when the model is rebuilt "
            "(usually a name of the module that defined it, which cannot be "
            "imported here); make that module importable (PYTHONPATH), or "
            "pass {fix} naming it.", fix=("custom_objects", "{name: object}"))
    if "Could not locate" in text or "Unknown layer" in text or (
            "custom" in text.lower() and "class" in text.lower()):
        cls = _class_name_in(text)
        return RenormConvertError(
            f"{path}: uses the class {cls}, which is not registered. Pass "
            "{fix} (a module that defines it, decorated with "
            "@keras.saving.register_keras_serializable()).",
            fix=("custom_objects", "{name: class}"))
    if isinstance(error, (OSError, zipfile.BadZipFile, EOFError)) or (
            not isinstance(error, (TypeError, ValueError)) and any(
                w in text for w in ("truncated", "signature", "Unable to open",
                                    "Unable to synchronously open",
                                    "BadZipFile", "not a zip", "File is not"))):
        return RenormConvertError(
            f"{path}: cannot be read as a Keras model (truncated or corrupted "
            f"file: {text[:160]}).")
    return RenormConvertError(f"{path}: cannot be loaded as a Keras model "
                      f"({type(error).__name__}: {text[:200]}).")


def _class_name_in(text):
    for marker in ("Could not locate class '", "Unknown layer: '", "class '",
                   "class_name': '"):
        if marker in text:
            return "'" + text.split(marker, 1)[1].split("'", 1)[0] + "'"
    return "(see the model's config)"


def save_atomically(model, path):
    """Saves `model` to `path` through a temporary file in the same
    directory, so that `path` is either the old file or the whole new one."""
    replace_atomically(path, model.save)


def _umask_mode():
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path, payload):
    """Writes bytes to `path` through a temporary file and a rename."""

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(payload)

    replace_atomically(path, write)


# Our temporary files: `.tmp-renorm-convert-<pid>-<random><suffix>`, so a
# later run can tell them (and whether their writer still lives) from
# anyone else's.
TEMP_PREFIX = ".tmp-renorm-convert-"
TEMP_PATTERN = r"\.tmp-renorm-convert-\d+-[^/]*"
_TEMP = re.compile(r"^\.tmp-renorm-convert-(\d+)-")
STALE_AFTER_S = 24 * 3600


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's live process
    return True


def remove_stale_temporaries(directory):
    """Removes temporary files of ours in `directory` left by a run that was
    killed (its process is gone, or the file is a day old); returns their
    names."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _TEMP.match(name)
        if not match:
            continue
        path = os.path.join(directory, name)
        try:
            old = time.time() - os.path.getmtime(path) > STALE_AFTER_S
            if (old or not _alive(int(match.group(1)))) and os.path.isfile(
                    path):
                os.unlink(path)
                removed.append(name)
        except OSError:
            pass
    return removed


def replace_atomically(path, write, suffix=None):
    """Calls `write(tmp)` on a temporary path beside `path` (same suffix),
    syncs it and renames it over `path`; on any failure, or a signal,
    removes it. An OSError names `path`, not the temporary file."""
    path = str(path)
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(directory)
    if suffix is None:
        suffix = os.path.splitext(path)[1]
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-",
                                   suffix=suffix, dir=directory)
    except OSError as e:
        raise OSError(e.errno, f"{path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp makes it private
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise OSError(e.errno, f"{path}: {e.strerror or e}") from None
    except BaseException:
        _discard(tmp)
        raise



def _discard(tmp):
    try:
        os.unlink(tmp)
    except OSError:
        pass
