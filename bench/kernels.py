"""The operator timings behind two runtime choices, on this machine.

    python bench/kernels.py [--repeats 200]

1. Skip corrections (``runtime/corrections.py: pointwise_conv``): a 1x1 convolution against the
   same map as one matrix product over the pixels in the input's layout, at the shapes of
   cifar_resnet56's three stages, batch 1 and 64, plain (NCHW) and channels-last inputs
   (``pointwise_conv`` runs the product on plain batches and the convolution elsewhere).
2. The BlockDrop policy's blocks (``runtime/policy.py``): its 3x3 convolutions (with the folded
   bias) at their input shapes, plain against channels-last, batch 1 and 64.

Random inputs and weights (the time does not depend on the values). Each operator is warmed
up, then timed ``--repeats`` times in a row (batch 64: a tenth as many); the median of 5 such
runs is reported in microseconds per call. Writes bench/results/kernels.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import machine, write_result

from dynconvert.runtime.corrections import pixel_product

# (channels, side) of the skipped blocks' inputs in cifar_resnet56's three stages
CORRECTION_SHAPES = [(16, 32), (32, 16), (64, 8)]
# (in channels, out channels, input side, stride) of the policy's 3x3 convolutions (16x16 input)
POLICY_CONVS = [(16, 16, 16, 1), (16, 32, 16, 2), (32, 32, 8, 1), (32, 64, 8, 2), (64, 64, 4, 1)]
LAYOUTS = {"plain": torch.contiguous_format, "channels_last": torch.channels_last}


def microseconds(fn, args: tuple, repeats: int) -> float:
    """Median over 5 runs of the mean time of ``repeats`` calls ``fn(*args)`` in a row, after a warm-up."""
    for _ in range(max(repeats // 10, 2)):
        fn(*args)
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn(*args)
        runs.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(runs)


def calls_per_run(batch: int, repeats: int) -> int:
    """``repeats`` at batch 1, a tenth as many (at least 5) for a batch."""
    return repeats if batch == 1 else max(repeats // 10, 5)


def product_in_layout(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The 1x1 convolution as one matrix product over the pixels, in ``x``'s own layout: the
    runtime's :func:`pixel_product` on a plain map, a linear layer over the channels of a
    channels-last one."""
    if x.is_contiguous():
        return pixel_product(x, weight, bias)
    matrix = weight.view(weight.shape[0], weight.shape[1])
    return F.linear(x.permute(0, 2, 3, 1), matrix, bias).permute(0, 3, 1, 2)


def corrections(repeats: int) -> list[dict]:
    rows = []
    for batch in (1, 64):
        for channels, side in CORRECTION_SHAPES:
            weight, bias = torch.randn(channels, channels, 1, 1), torch.randn(channels)
            for layout, memory_format in LAYOUTS.items():
                x = torch.randn(batch, channels, side, side).contiguous(memory_format=memory_format)
                n = calls_per_run(batch, repeats)
                expected = F.conv2d(x, weight, bias)
                torch.testing.assert_close(product_in_layout(x, weight, bias), expected, rtol=1e-4, atol=1e-4)
                rows.append(
                    {
                        "batch": batch,
                        "channels": channels,
                        "side": side,
                        "layout": layout,
                        "conv1x1_us": microseconds(F.conv2d, (x, weight, bias), n),
                        "product_us": microseconds(product_in_layout, (x, weight, bias), n),
                    }
                )
    return rows


def policy_convs(repeats: int) -> list[dict]:
    rows = []
    for batch in (1, 64):
        for c_in, c_out, side, stride in POLICY_CONVS:
            weight, bias = torch.randn(c_out, c_in, 3, 3), torch.randn(c_out)
            row = {"batch": batch, "in_channels": c_in, "out_channels": c_out, "side": side, "stride": stride}
            for layout, memory_format in LAYOUTS.items():
                x = torch.randn(batch, c_in, side, side).contiguous(memory_format=memory_format)
                w = weight.contiguous(memory_format=memory_format)
                n = calls_per_run(batch, repeats)
                row[f"{layout}_us"] = microseconds(F.conv2d, (x, w, bias, stride, 1), n)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    with torch.inference_mode():
        data = {
            "machine": machine(),
            "repeats": args.repeats,
            "corrections": corrections(args.repeats),
            "policy_convs": policy_convs(args.repeats),
        }
    path = write_result("kernels", data)
    for row in data["corrections"]:
        print(
            f"correction {row['layout']:>13} batch {row['batch']:>2} {row['channels']}x{row['side']}x{row['side']}: "
            f"1x1 conv {row['conv1x1_us']:8.1f} us, product {row['product_us']:8.1f} us"
        )
    for row in data["policy_convs"]:
        print(
            f"policy conv batch {row['batch']:>2} {row['in_channels']}->{row['out_channels']} at {row['side']}x"
            f"{row['side']} stride {row['stride']}: plain {row['plain_us']:8.1f} us, "
            f"channels-last {row['channels_last_us']:8.1f} us"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
