"""renorm-convert: Batch Renormalization for existing Keras models.

Convert every BatchNormalization of a Keras model to BatchRenormalization
(keeping all weights and statistics), fine-tune it with the paper's r_max /
d_max schedule on any Keras backend, and export it to ONNX with the
normalization folded away.

Exit status: 0 success, 2 bad input or usage (one line says what and how to
fix it), 1 internal error; 130 / 143 interrupted / terminated, 141 when the
reader of the output stopped early (`| head`).
"""

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from renorm_convert._internal import limits as _limits
from renorm_convert.cli import _args
from renorm_convert.cli._args import EXIT_INTERNAL, EXIT_USAGE
from renorm_convert.errors import RenormConvertError, python_name

# The commands, in --help order: each module has HELP, add_arguments(parser),
# check(args) (what can be checked before a backend loads) and run(args).
COMMANDS = ("inspect", "diagnose", "convert", "revert", "finetune", "export",
            "demo", "reproduce")

def one_line(error, command=None):
    """An error as the one line a person reads: flags (the options of the
    command, a name or its parser, that set the arguments it names), not
    arguments."""
    if isinstance(command, str):
        command = command_parser(command)
    if isinstance(error, RenormConvertError):
        text = error.render(_args.flag_namer(command) if command is not None
                            else python_name)
    else:
        text = str(error)
    text = " ".join(text.split())
    return text if len(text) <= 400 else text[:397] + "..."


def progress(message):
    print(f"[renorm-convert] {message}", file=sys.stderr, flush=True)


class _ProgressHandler(logging.Handler):
    """The library's notes (resuming, a damaged checkpoint skipped) as
    progress lines."""

    def emit(self, record):
        progress(record.getMessage())


def command_module(name):
    return importlib.import_module(f"renorm_convert.cli.{name}")


def command_parser(name):
    """The parser of one command."""
    parser = build_parser()
    subparsers = next(action for action in parser._actions
                      if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices[name]


def build_parser():
    from renorm_convert import __version__

    parser = _args.Parser(prog="renorm-convert", description=__doc__,
                          formatter_class=_args.Formatter)
    parser.add_argument("--version", action="version",
                        version=f"renorm-convert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                parser_class=_args.Parser)
    for name in COMMANDS:
        module = command_module(name)
        p = sub.add_parser(name, help=module.HELP,
                           description=_args.docstring(module),
                           formatter_class=_args.Formatter)
        module.add_arguments(p)
        p.set_defaults(module=module, parser=p)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every `finally` (temporary
    files, partial outputs) runs before the process ends."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _load_backend():
    """Keras and its backend (call it inside `filtered_stderr`)."""
    import importlib.util

    from renorm_convert.errors import BackendError

    backend = _limits.keras_backend()
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(
        backend)
    if module and importlib.util.find_spec(module) is None:
        others = [b for b in ("tensorflow", "jax", "torch")
                  if b != backend and importlib.util.find_spec(b)]
        hint = (f"set KERAS_BACKEND={others[0]} (installed here)" if others
                else "install it, or another backend and set KERAS_BACKEND")
        raise BackendError(
            f"Keras's backend is {backend} (KERAS_BACKEND, or Keras's "
            f"default), but {module} is not installed: {hint}.")
    import keras  # noqa: F401  (imports and registers our layers)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a one-line usage error
        return e.code
    module = getattr(args, "module", None)
    if module is None:
        parser.print_help()
        return EXIT_USAGE
    command, command_parser = args.command, args.parser
    handler = _ProgressHandler()
    library_log = logging.getLogger("renorm_convert")
    library_log.addHandler(handler)
    library_log.setLevel(logging.INFO)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    from renorm_convert._internal.logs import filtered_stderr

    try:
        # TensorFlow's native start-up lines are dropped from stderr
        # wherever they come from, everything else passes.
        with filtered_stderr():
            chosen = _limits.choose_backend()
            if chosen:
                progress(f"Keras backend: {chosen} (the one installed; set "
                         "KERAS_BACKEND to choose)")
            module.check(args)  # before any backend loads: instant refusals
            _load_backend()
            return module.run(args)
    except RenormConvertError as e:
        print(f"renorm-convert {command}: error: "
              f"{one_line(e, command_parser)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, _Terminated) else "interrupted"
        print(f"renorm-convert {command}: {what}; outputs not yet "
              "written were not written (temporary files removed)",
              file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except BrokenPipeError:
        # Whoever read our output stopped (`| head`): end quietly, as Unix
        # tools do, with nothing left for Python to flush at exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except OSError as e:
        print(f"renorm-convert {command}: error: {one_line(e)}",
              file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # an internal error: say so, briefly
        if os.environ.get("RENORM_CONVERT_DEBUG"):
            raise
        print(f"renorm-convert {command}: internal error: "
              f"{one_line(e)} (set RENORM_CONVERT_DEBUG=1 for "
              "the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        library_log.removeHandler(handler)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
