"""export.onnx_export's own graph optimisation: the same file as the exporter's optimize=True, and a convolution bias
of the wrong shape (which ONNX Runtime refuses on first use) refused at export."""
import warnings

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper
import pytest
import torch

from export import ExportError
from export.onnx_export import check_conv_biases, export_onnx, optimize_graph
from student import build_student


def _exporter_optimized(model, roi, path):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (torch.zeros(1, 1, *roi),), None, input_names=["image"],
                                    output_names=["logits"], opset_version=18, dynamo=True, optimize=True)
    program.save(str(path), external_data=False)
    return path


# SwinUNETR-tiny and -small were compared by hand on the demo's students (identical files; export/onnx_export.py):
# the exporter's optimiser takes ~40 s on SwinUNETR here, too long for the suite.
@pytest.mark.parametrize("name, roi", [("unet_small", [32, 32, 32]), ("basic_unet", [32, 32, 32])])
def test_export_writes_the_file_the_exporters_optimizer_writes(name, roi, tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = build_student(name, 8).eval()
    ours = export_onnx(model, roi, tmp_path / "ours.onnx", batch=1)
    theirs = _exporter_optimized(model, roi, tmp_path / "theirs.onnx")
    assert ours.read_bytes() == theirs.read_bytes()


def test_a_convolution_bias_of_the_wrong_shape_is_refused_naming_the_node():
    # The exporter's fault on SwinUNETR (zero biases of shape [C, 2] bound to bias-free convolutions), by hand.
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 1, 3, 3, 3], np.zeros(108, np.float32))
    bias = helper.make_tensor("b", TensorProto.FLOAT, [4, 2], np.zeros(8, np.float32))
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w", "b"], ["logits"], name="conv_1", pads=[1] * 6)],
                              "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 8, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 8, 8, 8])], [weight, bias])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    with pytest.raises(ExportError, match=r"model.onnx: Conv 'conv_1' has a bias of shape \(4, 2\), not \[4\]"):
        check_conv_biases(model, "model.onnx")
    optimize_graph(model)  # the zero bias goes, so the graph passes
    check_conv_biases(model, "model.onnx")
    assert [len(n.inputs) for n in model.graph if n.op_type == "Conv"] == [2]
