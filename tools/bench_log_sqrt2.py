#!/usr/bin/env python
"""onnxruntime CPU time of exact log-sqrt2 lowerings on one attention-map-sized tensor, side by side.

    python tools/bench_log_sqrt2.py                 # 192x3x49x49 softmax map, 4 bits, 1 thread, 9 rounds

Candidates (each checked bit-exact against fake quant before it is timed):
  - int64 two-sided: a rounded guess corrected by two comparisons (three Gathers), int64 indices;
  - int32 two-sided: the same with int32 indices (the lowering before the one-sided guess);
  - float code: the two-sided correction in float, one cast to int32 before the table Gather;
  - one-sided, Gather: a floored guess, one comparison, two Gathers;
  - one-sided, flat (`qdq.log_sqrt2_lowered`, TensorRT form): the same, both lookups as flat
    GatherElements, a product by 1/d instead of a quotient;
  - one-sided, flat, cast floors (the onnxruntime form): no Floor, the int32 Cast truncates, and
    below 8 bits no clamp of x before Log.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch

from repq_export.export.qdq import log_sqrt2_lowered
from repq_export.quant.log_sqrt2 import LogSqrt2Quantizer

LN2 = 0.6931471805599453


def guess_of(x, scale, levels):
    tiny = torch.finfo(torch.float32).tiny
    return torch.clamp(torch.round(torch.log(torch.clamp(x, min=tiny) / scale) * (-2.0 / LN2)), 0, levels)


def padded(upper):
    """The two-sided table: +inf, t_0 .. t_(2^n - 1), -inf."""
    inf = upper.new_full((1,), float("inf"))
    return torch.cat([inf, upper, -inf])


def lowered_int64(x, scale, upper, lut, n_bits):
    levels = 2**n_bits
    guess = guess_of(x, scale, levels).long()
    return lut[torch.clamp(guess - (x >= upper[guess]).long() + (x < upper[guess + 1]).long(), 0, levels)]


def lowered_int32(x, scale, upper, lut, n_bits):
    levels = 2**n_bits
    guess = guess_of(x, scale, levels).int()
    return lut[torch.clamp(guess - (x >= upper[guess]).int() + (x < upper[guess + 1]).int(), 0, levels)]


def lowered_float_code(x, scale, upper, lut, n_bits):
    levels = 2**n_bits
    guess = guess_of(x, scale, levels)
    index = guess.int()
    code = guess - (x >= upper[index]).float() + (x < upper[index + 1]).float()
    return lut[torch.clamp(code, 0, levels).int()]


def lowered_cast_floors(x, scale, upper, lut, n_bits):
    return log_sqrt2_lowered(x, scale, upper, lut, n_bits, cast_floors=True)


def lowered_one_sided_gather(x, scale, upper, lut, n_bits):
    levels = 2**n_bits
    guess = torch.floor(torch.log(torch.clamp(x, min=torch.finfo(torch.float32).tiny) / scale) * (-2.0 / LN2))
    guess = torch.clamp(guess, 0, levels - 1).int()
    return lut[guess + (x < upper[guess]).int()]


class Lowered(torch.nn.Module):
    def __init__(self, fn, q: LogSqrt2Quantizer, two_sided: bool) -> None:
        super().__init__()
        self.fn, self.n_bits = fn, q.bits
        self.register_buffer("scale", q.scale.detach().clone())
        upper = q.thresholds().detach().clone()
        self.register_buffer("upper", padded(upper) if two_sided else upper)
        self.register_buffer("lut", q.lut().detach().clone())

    def forward(self, x):
        return self.fn(x, self.scale, self.upper, self.lut, self.n_bits)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(192, 3, 49, 49) * 3, dim=-1)
    q = LogSqrt2Quantizer(args.bits)
    q.initialize(x)
    want = q(x).numpy().view(np.int32)
    sessions = {}
    for name, fn in (("int64 two-sided", lowered_int64), ("int32 two-sided", lowered_int32),
                     ("float code", lowered_float_code), ("one-sided, Gather", lowered_one_sided_gather),
                     ("one-sided, flat (TensorRT form)", log_sqrt2_lowered),
                     ("one-sided, flat, cast floors (onnxruntime form)", lowered_cast_floors)):
        buf = io.BytesIO()
        two_sided = fn not in (log_sqrt2_lowered, lowered_cast_floors, lowered_one_sided_gather)
        torch.onnx.export(Lowered(fn, q, two_sided), (x,), buf, dynamo=False, opset_version=17, input_names=["x"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = args.threads, 3
        sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        exact = np.array_equal(sess.run(None, {"x": x.numpy()})[0].view(np.int32), want)
        sessions[name] = (sess, exact)
    times = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, (sess, _) in sessions.items():
            start = time.perf_counter()
            sess.run(None, {"x": x.numpy()})
            times[name].append(time.perf_counter() - start)
    print(f"| lowering | exact | median ms | min ms |  ({tuple(x.shape)}, {args.bits} bits, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds)")
    print("|---|---|---|---|")
    for name, (_, exact) in sessions.items():
        print(f"| {name} | {exact} | {1000 * statistics.median(times[name]):.1f} | {1000 * min(times[name]):.1f} |")


if __name__ == "__main__":
    main()
