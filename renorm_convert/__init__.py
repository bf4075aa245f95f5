"""renorm_convert: convert Keras models to Batch Renormalization, fine-tune
them, and export them to ONNX with the normalization folded away."""

from renorm_convert.layers import BatchRenormalization
from renorm_convert.schedule import RenormSchedule
from renorm_convert import schedule

__all__ = ["BatchRenormalization", "RenormSchedule"]
__version__ = "0.1.0"

from renorm_convert.graph import model_graph  # noqa: E402
from renorm_convert.convert import convert, revert  # noqa: E402

__all__ += ["model_graph", "convert", "revert"]
