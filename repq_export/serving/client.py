"""The client of `repq-export serve`, through tritonclient: encoded image in, detections out."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import numpy as np

from ..errors import UserError
from . import codec

_REASON = re.compile(r"BadRequest: ([^\n\\]*)")
_ANY_ERROR = re.compile(r"(\w+(?:Error|Exception): [^\n\\]*)")


class ServerError(RuntimeError):
    """The server answered with an error (a refused request, or a failure inside it)."""


def parse_url(url: str) -> tuple[str, str]:
    """(protocol, host:port) of http://host:port, grpc://host:port or a bare host:port (HTTP)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "grpc") or not parts.hostname or parts.port is None:
        raise UserError(f"{url}: give the server as http://HOST:PORT or grpc://HOST:PORT")
    return parts.scheme, f"{parts.hostname}:{parts.port}"


def error_reason(exc: Exception) -> str:
    """The one line that says why the server refused a request (Triton wraps it in a traceback)."""
    text = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    found = _REASON.findall(text or "") or _ANY_ERROR.findall(text or "")
    return found[-1].strip()[:300] if found else (text or type(exc).__name__).strip().splitlines()[0][:300]


class DetectionClient:
    """A connection to one server; `detect` sends one image (its file bytes) and returns its detections."""

    def __init__(self, url: str, timeout_s: float = 60.0, model: str = codec.MODEL_NAME) -> None:
        try:
            if parse_url(url)[0] == "grpc":
                import tritonclient.grpc as triton
            else:
                import tritonclient.http as triton
        except ImportError:
            raise UserError("the client needs the [serve] extra (tritonclient): pip install "
                            "'repq-export[serve]'") from None
        self.protocol, self.address = parse_url(url)
        self.model, self.timeout_s, self._triton = model, timeout_s, triton
        kwargs = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if self.protocol == "http" else {}
        self.client = triton.InferenceServerClient(self.address, **kwargs)

    def ready(self) -> bool:
        """Triton's readiness of the server and of the model (False where it cannot be reached)."""
        try:
            return bool(self.client.is_server_ready() and self.client.is_model_ready(self.model))
        except Exception:  # connection refused, reset, timeout: not ready
            return False

    def detect(self, image: bytes, score_thr: float | None = None) -> codec.ServedDetections:
        """Detections of one encoded image (JPEG/PNG bytes); ServerError says why a request was refused."""
        if not image:
            raise ValueError("empty image: nothing to send")
        data = np.frombuffer(image, dtype=np.uint8)[None]
        inputs = [self._triton.InferInput(codec.IMAGE, list(data.shape), "UINT8")]
        inputs[0].set_data_from_numpy(data)
        if score_thr is not None:
            thr = np.array([[score_thr]], dtype=np.float32)
            inputs.append(self._triton.InferInput(codec.SCORE_THR, [1, 1], "FP32"))
            inputs[1].set_data_from_numpy(thr)
        names = (codec.BOXES, codec.SCORES, codec.LABELS, codec.CLASS_NAMES, codec.MASKS, codec.IMAGE_SIZE)
        outputs = [self._triton.InferRequestedOutput(n) for n in names]
        try:
            kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
            result = self.client.infer(self.model, inputs, outputs=outputs, **kwargs)
        except self._triton_exception() as exc:
            raise ServerError(error_reason(exc)) from None
        return codec.decode_response({n: result.as_numpy(n) for n in names})

    def _triton_exception(self) -> type[Exception]:
        from tritonclient.utils import InferenceServerException

        return InferenceServerException

    def close(self) -> None:
        """Close the connection (a server's shutdown waits for open HTTP connections)."""
        self.client.close()

    def __enter__(self) -> DetectionClient:
        return self

    def __exit__(self, *_) -> None:
        self.close()
