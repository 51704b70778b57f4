"""Calibration on several images with the reference's forward-order semantics: every quantizer
initialises once, from the inputs of *all* calibration images, each produced by upstream
quantizers that are already calibrated.

One forward per image, each in its own thread, in lockstep: a forward pre-hook stops every
forward at each uninitialised quantizer until all have arrived there; the last to arrive
initialises it from all their inputs (concatenated in image order, so the result does not depend
on thread timing), and all go on. Images keep their own sizes (no batch padding enters the
statistics). Every image must take the same path through the detector (the same quantizer calls
in the same order); a forward that finishes breaks the rendezvous, so a path that differs ends in
an error instead of a hang.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from repq_export.errors import UserError
from repq_export.hooks import hooked
from repq_export.quant.log_sqrt2 import LogSqrt2Quantizer
from repq_export.quant.uniform import UniformQuantizer

Quantizer = UniformQuantizer | LogSqrt2Quantizer


def initialize_from_many(q: Quantizer, inputs: Sequence[Tensor]) -> None:
    """Initialise ``q`` from several inputs at once, as if they were one tensor of its layout.
    Empty inputs are skipped (``q`` stays uninitialised if all are empty); weight quantizers
    (channel axis 0) see the same weight in every forward and use the first."""
    inputs = [x.detach() for x in inputs if x.numel()]
    if not inputs:
        return
    if isinstance(q, UniformQuantizer) and q.channel_axis == 0:
        q.initialize(inputs[0])
    elif isinstance(q, UniformQuantizer) and q.channel_axis == -1:
        channels = inputs[0].shape[-1]
        q.initialize(torch.cat([x.reshape(-1, channels) for x in inputs]))
    else:  # per-tensor uniform, log-sqrt2: every value counts alike
        q.initialize(torch.cat([x.reshape(-1) for x in inputs]))


class Lockstep:
    """The rendezvous of ``n`` forwards at every uninitialised quantizer of a model."""

    def __init__(self, n: int) -> None:
        self.arrived: list[tuple[nn.Module, Tensor] | None] = [None] * n
        self.barrier = threading.Barrier(n, action=self._initialize)
        self.local = threading.local()
        self.error: BaseException | None = None

    def _initialize(self) -> None:
        quantizers = {id(q) for q, _ in self.arrived}
        if len(quantizers) != 1:
            raise RuntimeError("calibration forwards reached different quantizers")
        initialize_from_many(self.arrived[0][0], [x for _, x in self.arrived])

    def pre_hook(self, q: nn.Module, args: tuple) -> None:
        """Forward pre-hook of every quantizer: wait for the others at an uninitialised one."""
        if not q.enabled or bool(q.initialized):
            return None
        self.arrived[self.local.index] = (q, args[0])
        self.barrier.wait()
        return None

    def run(self, index: int, forward) -> None:
        """Thread body: run ``forward()`` as image ``index``; any failure breaks the rendezvous."""
        self.local.index = index
        try:
            with torch.no_grad():
                forward()
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:  # reported by run_lockstep
            self.error = self.error or exc
        finally:
            self.barrier.abort()  # a forward that is done meets no one again


def run_lockstep(model: nn.Module, quantizers: Sequence[nn.Module], inputs: Sequence[tuple[Tensor, Tensor]]) -> None:
    """One forward of ``model`` per ``(img, img_hw)`` in ``inputs``, in lockstep at ``quantizers``."""
    lockstep = Lockstep(len(inputs))
    threads = [threading.Thread(target=lockstep.run, args=(i, lambda x=x: model(*x)), name=f"calib-{i}")
               for i, x in enumerate(inputs)]
    with hooked(((q, lockstep.pre_hook) for q in quantizers), pre=True):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if lockstep.error is not None:
        if isinstance(lockstep.error, RuntimeError) and "different quantizers" in str(lockstep.error):
            raise UserError("calibration images: the images took different paths through the detector; "
                            "calibrate on images that all give detections") from None
        raise lockstep.error
