"""renorm_convert: convert Keras models to Batch Renormalization, fine-tune
them, and export them to ONNX with the normalization folded away."""

from renorm_convert import convert as convert_module
from renorm_convert import schedule
from renorm_convert.convert import ConversionError, convert, revert
from renorm_convert import graph
from renorm_convert.graph import GraphError, model_graph
from renorm_convert.layers import BatchRenormalization
from renorm_convert.schedule import RenormSchedule

__all__ = [
    "BatchRenormalization",
    "ConversionError",
    "GraphError",
    "RenormSchedule",
    "convert",
    "model_graph",
    "revert",
]
__version__ = "0.1.0"

from renorm_convert.fold import ChannelAffine, fold  # noqa: E402
from renorm_convert.export import ExportError, ExportReport, export_onnx  # noqa: E402

__all__ += ["ChannelAffine", "fold", "ExportError", "ExportReport",
            "export_onnx"]
