"""The pre- and post-processing steps of a native Triton model repository, as Triton Python-backend models.

`repq-export triton-repo` writes a one-line model.py per step that imports TritonPythonModel from here, so
the steps run the project's own host-side code (it must be installed in Triton's Python environment);
which step a model is comes from its config's `stage` parameter. A refused request gets its own error
response; the others in the same call are unaffected.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ..data.postprocess import postprocess
from ..data.transforms import Preprocessed, PreprocessSettings, preprocess
from ..errors import UserError
from . import codec

PRE_OUTPUTS = ("img", "img_hw", "scale_factor", "ori_hw")
NET_OUTPUTS = ("boxes", "scores", "labels", "masks")
RESPONSE = (codec.BOXES, codec.SCORES, codec.LABELS, codec.CLASS_NAMES, codec.MASKS, codec.IMAGE_SIZE)


def run_preprocess(image: np.ndarray, settings: dict) -> dict[str, np.ndarray]:
    """Encoded image bytes -> the network's inputs and what postprocessing needs to undo the resize."""
    img = codec.decode_image(image.reshape(1, -1) if image.ndim == 1 else image)
    try:  # every setting, pad_to included: a static graph takes only its own input size
        prep = preprocess(img, **vars(PreprocessSettings.from_dict(settings)))
    except (ValueError, UserError) as exc:  # too thin to resize, or too large for a static graph
        raise codec.BadRequest(str(exc)) from None
    return {"img": prep.tensor.numpy(), "img_hw": prep.img_hw_tensor.numpy(),
            "scale_factor": prep.scale_factor, "ori_hw": np.array(prep.ori_hw, np.int64)}


def run_postprocess(tensors: dict[str, np.ndarray], classes: list[str] | None) -> dict[str, np.ndarray]:
    """Network outputs (+ the preprocessing facts and an optional threshold) -> the response's tensors."""
    ori_hw = tuple(int(v) for v in tensors["ori_hw"].reshape(-1))
    img_hw = tuple(int(v) for v in tensors["img_hw"].reshape(-1))
    prep = Preprocessed(torch.empty(0), img_hw, ori_hw, tensors["scale_factor"].astype(np.float32).reshape(4))
    dets = postprocess(*(tensors[n] for n in NET_OUTPUTS), prep)
    thr = codec.score_threshold({codec.SCORE_THR: tensors[codec.SCORE_THR]} if codec.SCORE_THR in tensors else {})
    return codec.encode_response(dets, classes, thr, ori_hw)


class TritonPythonModel:
    """Triton's Python-backend entry point for the `preprocess` and `postprocess` steps."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.stage = params["stage"]
        self.settings = json.loads(params["preprocess"])
        self.classes = json.loads(params.get("classes", "null"))
        self.inputs = [i["name"] for i in config["input"]]

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils  # only inside Triton's Python backend

        responses = []
        for request in requests:
            tensors = {}
            for name in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    tensors[name] = tensor.as_numpy()
            try:
                if self.stage == "preprocess":
                    outputs = run_preprocess(tensors[codec.IMAGE], self.settings)
                else:
                    outputs = run_postprocess(tensors, self.classes)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in outputs.items()]))
            except codec.BadRequest as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"BadRequest: {exc}")))
        return responses
