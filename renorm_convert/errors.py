"""One base for every refusal of bad input, carrying the argument at fault,
and the few kinds a caller may want to tell apart.

Library messages name Python arguments (`non_iid_classes=3: ...`); the
command line renders the same error with its flags (`--non-iid 3: ...`)
from the structure, never by rewriting the text.
"""

import numbers


def _value_text(value, quote):
    if isinstance(value, str) and quote:
        return repr(value)
    return str(value)


def python_name(argument, value, quote=True):
    """How the library writes an argument and its value: `name=value`
    (`name=` alone when the value is not given)."""
    if value is _NOTHING:
        return f"{argument}="
    return f"{argument}={_value_text(value, quote)}"


class _Nothing:
    def __repr__(self):
        return "<nothing>"


_NOTHING = _Nothing()


class RenormConvertError(ValueError):
    """Bad input: what was wrong and what to do.

    Args:
        detail: The message. `{arg}` in it stands for the argument and its
            value (then no prefix is added); `{fix}` for `fix`, another
            argument and the value that would fix it.
        argument: The Python argument at fault, or None.
        value: What it received.
        fix: (argument, value) that the message suggests, or None; a third
            item is how the library says it (when the fix is a call, not
            an argument).
        quote: Write string values with quotes (not for paths).
    """

    def __init__(self, detail, argument=None, value=_NOTHING, *, fix=None,
                 quote=True):
        self.detail = detail
        self.argument = argument
        self.value = value
        self.fix = fix
        self.quote = quote
        super().__init__(self.render())

    def render(self, name=python_name):
        """The message with arguments written by `name(argument, value,
        quote)` (the command line passes one that writes flags)."""
        text = self.detail
        if self.fix is not None:
            if len(self.fix) > 2 and name is python_name:
                fixed = self.fix[2]
            else:
                fixed = name(self.fix[0], self.fix[1], True)
            text = text.replace("{fix}", fixed)
        arg = None
        if self.argument is not None:
            arg = name(self.argument, self.value, self.quote)
            text = text.replace("{arg}", arg)
        if arg is not None and "{arg}" not in self.detail:
            text = f"{arg}: {text}"
        return text

    def __str__(self):
        return self.render()

    def __reduce__(self):  # picklable across processes, like ValueError
        return (_rebuild, (type(self), self.detail, self.argument,
                           self.value, self.fix, self.quote))


def _rebuild(cls, detail, argument, value, fix, quote):
    error = cls.__new__(cls)
    RenormConvertError.__init__(error, detail, argument, value, fix=fix,
                                quote=quote)
    return error


class ExportError(RenormConvertError):
    """The model cannot be exported; the message says why and what to do."""


class BackendError(RenormConvertError):
    """A feature that this Keras backend, or a missing package, cannot give
    (e.g. tf.distribute without TensorFlow)."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; `model` holds the last good weights
    and optimizer state, `result` the run until then."""

    def __init__(self, message, model, result):
        super().__init__(message)
        self.model = model
        self.result = result


def check_integer(value, argument, minimum=1, *, none=None):
    """`value` as an int >= `minimum`. None is accepted (and returned) when
    `none` says what it means ("for all batches"); anything else (a bool, a
    float, a string) is refused, naming `argument`."""
    if value is None and none is not None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or value < minimum:
        alternative = f", or None {none}" if none is not None else ""
        raise RenormConvertError(
            f"{{arg}}: expected an integer >= {minimum}{alternative}.",
            argument, value)
    return int(value)


NOTHING = _NOTHING
