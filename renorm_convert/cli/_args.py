"""The command line's parser, value types and the argument groups several
commands share, each defined once. Nothing here imports a backend."""

import argparse
import math
import shutil

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2

# What `--data SOURCE` takes (renorm_convert.data.load_source).
SOURCES = "fashion-mnist[:DIR], digits, npz:PATH, or an image directory"


def _read(text, cast, noun):
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {noun}; got {text!r}") from None


def integer(minimum):
    """An argparse type: an integer >= minimum."""

    def parse(text):
        value = _read(text, int, "an integer")
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}; got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def number(minimum=None, maximum=None, *, above=None, below=None):
    """An argparse type: a finite float within the bounds given."""

    def parse(text):
        value = _read(text, float, "a number")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(
                f"expected a finite number; got {text}")
        for bound, ok, words in ((minimum, lambda b: value >= b, ">="),
                                 (above, lambda b: value > b, ">"),
                                 (maximum, lambda b: value <= b, "<="),
                                 (below, lambda b: value < b, "<")):
            if bound is not None and not ok(bound):
                raise argparse.ArgumentTypeError(
                    f"expected a number {words} {bound}; got {text}")
        return value

    parse.__name__ = "number"
    return parse


def opset(text):
    # No backend is loaded for this.
    from renorm_convert._internal.limits import MAX_OPSET, MIN_OPSET

    value = integer(MIN_OPSET)(text)
    if value > MAX_OPSET:
        raise argparse.ArgumentTypeError(
            f"expected an opset from {MIN_OPSET} to {MAX_OPSET}; got {value}")
    return value


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (what was wrong, and where the help is),
    exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see "
                              f"{self.prog} --help)\n")


def _terminal_width():
    return shutil.get_terminal_size((100, 24)).columns - 2


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default when it has one; option
    and command names get a wide column so that the lists do not wrap."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=min(
            100, max(80, _terminal_width())))

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is not None and default is not False
                and default != argparse.SUPPRESS and action.option_strings
                and "default" not in text):
            text += " (default: %(default)s)"
        return text

    def add_argument(self, action):
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            # argparse measures the command names one indent short of
            # where it prints them, and then wraps the longest.
            longest = max(len(a.metavar or a.dest)
                          for a in action._get_subactions())
            self._action_max_length = max(
                self._action_max_length,
                longest + self._current_indent + 2 * self._indent_increment)


# --- options and argument groups ---------------------------------------------
#
# Each option is defined once, here or in its command's module, with the
# library argument its value becomes: an error about that argument (which
# the library raises naming it, `non_iid_classes=3: ...`) is then written
# with the flag (`--non-iid 3: ...`), read off the parser (`flag_namer`).


def option(group, *flags, argument=None, shown=None, **kwargs):
    """Adds an option to `group` (a parser or argument group).

    Args:
        argument: The library argument (or a tuple of the arguments) the
            option's value becomes; default: its dest.
        shown: How an error that suggests a value for that argument writes
            the option (e.g. "--custom-objects your.module"); default: the
            flag, with the value when there is one.
    """
    action = group.add_argument(*flags, **kwargs)
    names = argument or action.dest
    action.arguments = (names,) if isinstance(names, str) else tuple(names)
    action.shown = shown
    return action


def flag_namer(parser):
    """The `name(argument, value, quote)` an error renders its arguments
    with at this command's line: the option that sets that argument, else
    the Python name."""
    from renorm_convert.errors import NOTHING, python_name

    options = {}
    for action in parser._actions:  # argparse's list of every option
        for argument in getattr(action, "arguments", ()):
            options.setdefault(argument, action)

    def name(argument, value, quote=True):
        action = options.get(argument)
        if action is None or not action.option_strings:
            return python_name(argument, value, quote)
        flag = max(action.option_strings, key=len)
        if action.shown is not None:
            return action.shown
        if action.nargs == 0 or value is NOTHING or value is None:
            return flag
        text = repr(value) if isinstance(value, str) and quote else str(value)
        return f"{flag} {text}"

    return name


def model_input(p):
    """MODEL and how to load it."""
    p.add_argument("model", metavar="MODEL", help=".keras or .h5 model file")
    model_loading(p)


def model_loading(p):
    g = p.add_argument_group("loading the model")
    option(g, "--unsafe", action="store_true", argument="safe_mode",
           help="allow Lambda layers' Python code in the file to run "
                "(Keras's safe_mode=False); only for files you trust")
    option(g, "--custom-objects", metavar="MODULE", action="append",
           shown="--custom-objects your.module",
           help="import this module (e.g. mypkg.layers) so the custom "
                "layers it defines can be loaded; repeatable")


def output(p, suffix):
    p.add_argument("-o", "--output", required=True, metavar=f"OUT{suffix}",
                   help="the output file (written atomically; never one of "
                        "the inputs)")


def data(p, required=False, default=None, what="the images to train on"):
    p.add_argument("--data", required=required, default=default,
                   metavar="SOURCE", help=f"{what}: {SOURCES}")


def layer_options(p, microbatch_default=None):
    """The BatchRenormalization settings convert gives every new layer."""
    g = p.add_argument_group("batch renormalization layers")
    option(g, "--r-max", type=number(), dest="r_max",
           help="r is clipped to [1/r_max, r_max] (default 3; finetune's "
                "schedule starts it at 1)")
    option(g, "--d-max", type=number(), dest="d_max",
           help="d is clipped to [-d_max, d_max] (default 5; finetune's "
                "schedule starts it at 0)")
    option(g, "--renorm-momentum", type=number(0.0, below=1.0),
           dest="renorm_momentum",
           help="momentum of the renorm statistics (default 0.99)")
    microbatch(g, microbatch_default)


LAYER_OPTIONS = ("r_max", "d_max", "renorm_momentum", "microbatch_size")


def layer_kwargs(args):
    """The layer settings given (`layer_options`), as library arguments."""
    return {key: getattr(args, key) for key in LAYER_OPTIONS
            if getattr(args, key, None) is not None}


def microbatch(p, default=None):
    option(p, "--microbatch", type=integer(1), metavar="M", default=default,
           dest="microbatch_size",
           help="in training, normalize groups of M consecutive examples of "
                "each batch with their own moments (the paper's "
                "microbatches)" + ("" if default is not None else
                                   "; default: as the model's layers have "
                                   "it (none for a fresh conversion)"))


def seed(p):
    option(p, "--seed", type=integer(0), default=0,
           help="seeds data order, subsets and initialization")


def training(p, *, epochs=1, batch_size=32, lr=1e-3, momentum=None):
    """How long, in what batches, how fast."""
    g = p.add_argument_group("training")
    option(g, "--epochs", type=integer(1), default=epochs,
           help="passes over the training data")
    option(g, "--batch-size", type=integer(1), default=batch_size,
           help="examples per training step")
    option(g, "--lr", type=number(above=0.0), default=lr,
           argument="learning_rate", help="learning rate")
    what = ("momentum of every normalization layer's moving statistics"
            + (" (0.9 suits runs of a few thousand steps; default: keep the "
               "model's)" if momentum is None else ""))
    option(g, "--momentum", type=number(0.0, below=1.0), default=momentum,
           help=what)
    return g


def sizes(p, train=None, val=None):
    option(p, "--train-size", type=integer(1), metavar="N", default=train,
           argument="train", help="use N training examples"
                                  + ("" if train else " (default: all)"))
    option(p, "--val-size", type=integer(0 if val is None else 1),
           metavar="N", default=val, argument="val",
           help="use N validation examples"
                + ("" if val else " (default: all)"))


def scaling(p):
    option(p, "--scaling", choices=["unit", "symmetric", "raw"],
           default="unit", help="pixel scaling the model expects: unit "
                                "[0,1], symmetric [-1,1], or raw [0,255]")


def docstring(module):
    """A command module's docstring as --help prints it (no indentation)."""
    import inspect

    return inspect.cleandoc(module.__doc__ or "")
