"""Output paths, checked for a person before any work: every place a run
writes, against every input and against each other. The messages name the
flags. Nothing here imports a backend."""

import os

from renorm_convert.errors import RenormConvertError


def check_output(output, inputs, suffixes):
    """Refuses an output path that is an input (also through `..`, a
    symbolic or a hard link), is a directory, has the wrong suffix, or lies
    in a directory that does not exist or cannot be written."""
    output = str(output)
    if not output.lower().endswith(suffixes):
        raise RenormConvertError(
            f"-o {output}: the output name must end in "
            f"{' or '.join(suffixes)}.")
    check_outputs([("-o", output, "file")],
                  [("model", path) for path in inputs])


def _real(path):
    return os.path.realpath(os.path.abspath(str(path)))


def _same(a, b):
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _inside(path, directory):
    inner, outer = _real(path), _real(directory)
    return inner != outer and inner.startswith(outer.rstrip(os.sep) + os.sep)


def _check_location(flag, path, kind):
    if kind == "file":
        if os.path.isdir(path):
            raise RenormConvertError(
                f"{flag} {path}: is a directory; give a file "
                "name.")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise RenormConvertError(
                f"{flag} {path}: the directory {directory} does "
                "not exist; create it first.")
    else:
        if os.path.exists(path) and not os.path.isdir(path):
            raise RenormConvertError(
                f"{flag} {path}: is a file, not a directory; "
                "give a directory.")
        directory = os.path.abspath(path)
        while not os.path.exists(directory):
            directory = os.path.dirname(directory)
        if not os.path.isdir(directory):
            raise RenormConvertError(
                f"{flag} {path}: {directory} is a file, not a "
                "directory.")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise RenormConvertError(
            f"{flag} {path}: the directory {directory} is not "
            "writable.")


def check_outputs(outputs, inputs=()):
    """Checks, before any work, every place a run will write.

    Args:
        outputs: (flag, path, kind) triples, kind "file", "dir" (a
            directory of the run's own, which must not hold an input or
            another output) or "logdir" (a directory the run adds files
            to, such as TensorBoard's).
        inputs: (what, path) pairs: model files, data files or folders.

    Raises:
        RenormConvertError: an output is an input or holds one, two outputs
            collide, or a location is missing, of the wrong kind or not
            writable.
    """
    outputs = [(flag, str(path), kind) for flag, path, kind in outputs]
    inputs = [(what, str(path)) for what, path in inputs if path]
    for flag, path, kind in outputs:
        _check_location(flag, path, kind)
        for what, source in inputs:
            if _same(path, source):
                raise RenormConvertError(
                    f"{flag} {path}: is the input file {source} (the {what}); "
                    "give another output path (inputs are never "
                    "overwritten).")
            if kind == "dir" and _inside(source, path):
                raise RenormConvertError(
                    f"{flag} {path}: holds the input {source} (the {what}); "
                    "give a directory of its own.")
            if os.path.isdir(source) and _inside(path, source):
                raise RenormConvertError(
                    f"{flag} {path}: lies inside the input directory "
                    f"{source} (the {what}); write elsewhere.")
    for i, (flag, path, kind) in enumerate(outputs):
        for other_flag, other, other_kind in outputs[i + 1:]:
            if _same(path, other) or (kind == "dir" and _inside(other, path)) or (
                    other_kind == "dir" and _inside(path, other)):
                raise RenormConvertError(
                    f"{flag} {path} and {other_flag} {other}: would write "
                    "the same place; give each output its own path.")
