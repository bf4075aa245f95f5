"""Runs the command line with a fault at one chosen moment, as a crash,
`kill -9` or a `SIGTERM` would strike there:

    python tests/faults.py POINT[:N] SIGNAL -- renorm-convert arguments...

The process sends itself SIGNAL (SIGKILL, SIGTERM, ...) at the N-th passage
(default 1) of POINT. The points are calls into Keras, onnxruntime and the
OS that the package makes, wrapped here from the outside (as Keras's own
backup-and-restore tests interrupt `fit` with a callback): the package
carries no test hook.

    checkpoint-write  a checkpoint's weights file was just written
                      (`keras.Model.save_weights`), its metadata not yet
    after-training    `keras.Model.fit` returned, no output written yet
    export-verify     onnxruntime opens the exported model to verify it
    before-rename     a finished temporary file of ours is about to take
                      its name (`os.replace`)
"""

import functools
import os
import signal
import sys


def _strike_at(nth, kind):
    """A function that sends the signal at its `nth` call."""
    calls = [0]

    def passage():
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), getattr(signal, kind))

    return passage


def _after(owner, name, passage):
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        passage()
        return result

    setattr(owner, name, wrapped)


def _before(owner, name, passage, when=lambda *args: True):
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        if when(*args):
            passage()
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)


def install(point, nth=1, kind="SIGKILL"):
    """Wraps the call `point` names so that its `nth` passage signals."""
    passage = _strike_at(nth, kind)
    if point == "checkpoint-write":
        import keras

        _after(keras.Model, "save_weights", passage)
    elif point == "after-training":
        import keras

        _after(keras.Model, "fit", passage)
    elif point == "export-verify":
        import onnxruntime

        _before(onnxruntime.InferenceSession, "__init__", passage)
    elif point == "before-rename":
        from renorm_convert.io import TEMP_PREFIX

        _before(os, "replace", passage, lambda source, *rest: os.path.basename(
            str(source)).startswith(TEMP_PREFIX))
    else:
        raise SystemExit(f"faults.py: unknown point {point!r}")


def main(argv):
    separator = argv.index("--")
    point, _, nth = argv[0].partition(":")
    kind = argv[1] if separator > 1 else "SIGKILL"
    install(point, int(nth or 1), kind)
    from renorm_convert.cli import main as cli

    return cli(argv[separator + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
