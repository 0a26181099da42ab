"""Edge runtime: NIfTI in, mask out, on ONNX Runtime or OpenVINO; numpy and nibabel only (no torch, no MONAI).

    from deploy import Segmenter
    Segmenter("bundle/", runtime="openvino", precision="int8", threads=2).segment_file("ct.nii.gz", "mask.nii.gz")
"""
from deploy.bundle import file_sha256, load_bundle
from deploy.errors import (BundleError, DeployError, ImplausibleInputError, ImplausibleInputWarning, InputVolumeError,
                           RuntimeChoiceError)
from deploy.plausibility import Assessment, assess_ct
from deploy.segmenter import Segmenter

__all__ = ["Assessment", "BundleError", "DeployError", "ImplausibleInputError", "ImplausibleInputWarning",
           "InputVolumeError", "RuntimeChoiceError", "Segmenter", "assess_ct", "file_sha256", "load_bundle"]
