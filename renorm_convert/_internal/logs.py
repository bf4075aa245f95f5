"""Hides TensorFlow's native start-up chatter (absl INFO lines written by C++
straight to file descriptor 2, which no Python setting silences) while
letting everything else on stderr through."""

import contextlib
import os
import re
import sys
import threading

_NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog"
    rb"|[IW]\d{4} \d\d:\d\d:\d\d"
    rb"|I\d{4} "
    rb"|E\d{4} .*(cuInit|cuda)"
    rb"|To enable the following instructions"
    rb"|.*This TensorFlow binary is optimized)"
)


@contextlib.contextmanager
def quiet_start():
    """Within the block Keras may load its backend for the first time: the
    backend's native start-up lines are dropped (the same filter), and
    TensorFlow's devices are set up before leaving (where it writes its
    "failed call to cuInit" error on a machine without a GPU), so that a
    library user does not see them either."""
    with filtered_stderr():
        yield
        if "tensorflow" in sys.modules:
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")


@contextlib.contextmanager
def filtered_stderr():
    """Within the block, lines written to fd 2 that are TensorFlow's native
    INFO chatter are dropped; every other line is passed on."""
    if os.environ.get("RENORM_CONVERT_VERBOSE"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield  # no real stderr (e.g. captured by a test runner)
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump():
        with os.fdopen(read_end, "rb") as source:
            for line in source:
                if not _NOISE.match(line):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # closes the last write end: the pump sees EOF
        thread.join(timeout=5)
        os.close(saved)
