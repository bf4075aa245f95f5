"""Resumable training state on disk that never touches anything else.

A checkpoint directory is ours only when we created it, or when it holds
nothing but files of ours; a marker file says so. We write and delete only
our own names in it (never `rmtree`), each checkpoint through a temporary
file and a rename, and keep the previous one until the new one is complete.
Every checkpoint's metadata records the size and sha256 of its weights, so a
damaged one is found and the one before it used instead.

A directory is held by one run at a time: a lock file names the holder's
process and host, and an advisory lock on it (released by the system when
the process ends, even by `kill -9`) tells a live holder from a dead one.

Layout:
    DIR/.renorm-convert-checkpoint      the marker
    DIR/.renorm-convert-lock            the holder: pid, host, since when
    DIR/epoch-0003.weights.h5           model and optimizer variables
    DIR/epoch-0003.json                 epoch, step, sha256, size, history
    DIR/worker-N/                       a non-chief worker's own checkpoints
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import time

import renorm_convert.io as _io
from renorm_convert.io import RenormConvertError, write_atomically

MARKER = ".renorm-convert-checkpoint"
LOCK = ".renorm-convert-lock"
KEEP = 2
_OURS = re.compile(r"^(epoch-\d+\.(weights\.h5|json)|worker-\d+|"
                   + re.escape(MARKER) + r"|" + re.escape(LOCK) + r"|"
                   + _io.TEMP_PATTERN + r")$")
_META = re.compile(r"^epoch-(\d+)\.json$")




def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check(directory):
    """Refuses, without writing anything, a `directory` that is a file or
    holds anything we did not write."""
    directory = str(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise RenormConvertError(
            "is a file; give a directory (a new or empty one) for "
            "checkpoints.", "checkpoint_dir", directory, quote=False)
    if not os.path.isdir(directory):
        return
    if not is_ours(directory):
        foreign = sorted(n for n in os.listdir(directory)
                         if not _OURS.match(n))
        if foreign:
            raise RenormConvertError(
                "holds files that are not renorm-convert checkpoints "
                f"({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); give a new or "
                "empty directory (nothing in it was changed).",
                "checkpoint_dir", directory, quote=False)
    holder = live_holder(directory)
    if holder is not None:
        raise RenormConvertError(_in_use(holder), "checkpoint_dir", directory,
                              quote=False)


def _in_use(holder):
    return (f"is in use by another run (process {holder.get('pid')} on "
            f"{holder.get('host')}, since {holder.get('since', '?')}); wait "
            "for it to finish, or give another directory.")


def _read_holder(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def live_holder(directory):
    """The lock record ({pid, host, since}) of a live run holding
    `directory` (this process excepted), or None."""
    path = os.path.join(str(directory), LOCK)
    if not os.path.exists(path) or str(os.path.realpath(path)) in _HELD:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_holder(path) or {"pid": "?", "host": "?"}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# realpath of a lock file -> [fd, count] for the locks this process holds.
_HELD = {}


@contextlib.contextmanager
def hold(directory, notes=None):
    """Holds `directory` for this run (reentrant within a process): refuses,
    naming the holder, a directory another live run holds; takes over, and
    says so in `notes`, a lock left by a run that ended without releasing
    it. The directory must exist."""
    path = os.path.join(str(directory), LOCK)
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read_holder(path)
        os.close(fd)
        raise RenormConvertError(_in_use(holder), "checkpoint_dir",
                              str(directory), quote=False) from None
    previous = _read_holder(path)
    if previous.get("pid") not in (None, os.getpid()) and notes is not None:
        notes.append(f"took over the lock of {directory} left by process "
                     f"{previous.get('pid')} on {previous.get('host')}, "
                     "which no longer runs")
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        _HELD.pop(key, None)
        try:
            os.unlink(path)
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def claim(directory):
    """Makes `directory` ours (creating it if needed); refuses a file, a
    directory holding anything we did not write, or one another run
    holds."""
    directory = str(directory)
    check(directory)
    os.makedirs(directory, exist_ok=True)
    marker = os.path.join(directory, MARKER)
    if not os.path.exists(marker):
        write_atomically(marker, json.dumps(
            {"written_by": "renorm-convert", "format": 1}).encode())
    return directory


def is_ours(directory):
    return os.path.isfile(os.path.join(str(directory), MARKER))


class State:
    """A checkpoint found on disk: `epoch` and `step` done, the weights'
    path, and the history of the epochs before it."""

    def __init__(self, directory, meta):
        self.directory = directory
        self.epoch = int(meta["epoch"])
        self.step = int(meta["step"])
        self.weights = os.path.join(directory, meta["weights"])
        self.history = meta.get("history", {})
        self.steps = meta.get("steps", [])
        self.extra = meta.get("extra", {})


def _entries(directory):
    found = []
    for name in os.listdir(directory):
        match = _META.match(name)
        if match:
            found.append((int(match.group(1)), name))
    return sorted(found, reverse=True)


def latest(directory):
    """The newest complete, undamaged checkpoint in `directory` (or None),
    and a list of notes on the damaged ones skipped."""
    notes = []
    if not directory or not os.path.isdir(directory):
        return None, notes
    for epoch, name in _entries(directory):
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                meta = json.load(f)
            weights = os.path.join(directory, meta["weights"])
            size = os.path.getsize(weights)
            if size != meta["size"] or _sha256(weights) != meta["sha256"]:
                raise ValueError("its weights file does not match its "
                                 "recorded size and sha256")
            return State(directory, meta), notes
        except (OSError, ValueError, KeyError, TypeError) as e:
            notes.append(f"the checkpoint of epoch {epoch} in {directory} is "
                         f"damaged ({type(e).__name__}: {e}); skipped")
    return None, notes


def write(directory, model, *, epoch, step, history, steps, extra=None):
    """Writes the checkpoint of `epoch` atomically, then removes the ones
    older than the previous (and any of later epochs)."""
    base = f"epoch-{epoch:04d}"
    weights = os.path.join(directory, base + ".weights.h5")
    record = {}

    def save(tmp):
        model.save_weights(tmp)
        record["size"] = os.path.getsize(tmp)
        record["sha256"] = _sha256(tmp)

    # Keras insists on the .weights.h5 suffix for the temporary file too.
    _io.replace_atomically(weights, save, suffix=".weights.h5")
    meta = {"epoch": int(epoch), "step": int(step),
            "weights": os.path.basename(weights), **record,
            "history": history, "steps": steps, "extra": extra or {}}
    write_atomically(os.path.join(directory, base + ".json"),
                     json.dumps(meta).encode())
    # Later epochs than this one are left from a run that went past here
    # and whose checkpoints were found damaged: stale now.
    entries = _entries(directory)
    for old_epoch, _ in entries:
        if old_epoch > epoch:
            _remove_checkpoint(directory, old_epoch)
    for old_epoch, _ in [e for e in entries if e[0] <= epoch][KEEP:]:
        _remove_checkpoint(directory, old_epoch)


def _remove_checkpoint(directory, epoch):
    base = os.path.join(directory, f"epoch-{epoch:04d}")
    # Metadata first: a weights file without it is never used.
    for path in (base + ".json", base + ".weights.h5"):
        if os.path.exists(path):
            os.unlink(path)


def remove(directory):
    """Deletes our checkpoints, the marker and our temporary files (of
    workers too), then the directory if that leaves it empty. Anything
    else in it stays."""
    directory = str(directory)
    if not is_ours(directory):
        return
    holder = live_holder(directory)
    if holder is not None:
        raise RenormConvertError(_in_use(holder), "checkpoint_dir", directory,
                              quote=False)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith("worker-") and os.path.isdir(path):
            remove(path)
    for epoch, _ in _entries(directory):
        _remove_checkpoint(directory, epoch)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if _OURS.match(name) and name not in (MARKER, LOCK) and \
                os.path.isfile(path) and (
                name.endswith((".json", ".weights.h5")) or
                re.match(_io.TEMP_PATTERN, name)):
            os.unlink(path)
    os.unlink(os.path.join(directory, MARKER))
    lock = os.path.join(directory, LOCK)
    if os.path.exists(lock) and (os.path.realpath(lock) in _HELD
                                 or live_holder(directory) is None):
        os.unlink(lock)  # ours, or left by a run that ended
    try:
        os.rmdir(directory)
    except OSError:
        pass  # something of someone else's is in it: leave it
