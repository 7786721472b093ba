"""Analysis, not part of the library: would one fused CUDA kernel per substep beat torch's two kernels?

On a GPU an epsilon substep's update is two ``torch.add`` kernels (``prev = first + c*model_output`` and
``pred = sample + q*model_output``; ``first`` is the sample on Euler substeps and the stored sample on midpoint
ones): four array reads and two writes, where one fused kernel needs three reads (two on Euler substeps) and
two writes. This times, per substep, that pair against a Triton kernel computing both outputs in one pass,
against the same pair under ``torch.compile`` (Inductor fuses it into one kernel), and against the memory floor
of the benchmarks (two copies), on a 16x4x256x256 and a 1x4x64x64 float32 latent; it first checks that all
three give the same bits. Needs CUDA and Triton; results are in docs/performance.md.

    python -m benchmarks.cuda_fused
"""

import statistics
import time

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _update(prev_ptr, pred_ptr, first_ptr, sample_ptr, output_ptr, n, c, q, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    sample = tl.load(sample_ptr + offsets, mask=mask)
    output = tl.load(output_ptr + offsets, mask=mask)
    first = tl.load(first_ptr + offsets, mask=mask)
    tl.store(prev_ptr + offsets, first + c * output, mask=mask)
    tl.store(pred_ptr + offsets, sample + q * output, mask=mask)


def triton_update(first, sample, output, c, q):
    prev, pred = torch.empty_like(sample), torch.empty_like(sample)
    _update[(triton.cdiv(sample.numel(), BLOCK),)](prev, pred, first, sample, output, sample.numel(), c, q, BLOCK=BLOCK)
    return prev, pred


def torch_update(first, sample, output, c, q):
    return torch.add(first, output, alpha=c), torch.add(sample, output, alpha=q)


@torch.compile(fullgraph=True)
def compiled_update(first, sample, output, c, q):  # c, q: 0-d tensors, so that no value recompiles
    return first + c * output, sample + q * output


def main(shapes=((16, 4, 256, 256), (1, 4, 64, 64)), rounds=200):
    coefficients = [(-0.37 - 0.01 * i, -1.3 + 0.02 * i) for i in range(10)]  # five Euler, five midpoint
    as_tensors = [tuple(torch.tensor(v, device="cuda") for v in pair) for pair in coefficients]
    for shape in shapes:
        generator = torch.Generator(device="cuda").manual_seed(0)
        x0, stored, output = (torch.randn(shape, device="cuda", generator=generator) for _ in range(3))
        sources = [torch.randn(shape, device="cuda") for _ in range(2)]
        targets = [torch.empty_like(s) for s in sources]

        def loop(kind):
            x = x0
            for i, (c, q) in enumerate(coefficients):
                first = x if i % 2 == 0 else stored
                if kind == "floor":
                    for source, target in zip(sources, targets):
                        target.copy_(source)
                elif kind == "compiled":
                    x, _ = compiled_update(first, x, output, *as_tensors[i])
                else:
                    x, _ = (torch_update if kind == "torch" else triton_update)(first, x, output, c, q)

        expected = torch_update(stored, x0, output, *coefficients[1])
        same = {
            "triton": triton_update(stored, x0, output, *coefficients[1]),
            "compiled": compiled_update(stored, x0, output, *as_tensors[1]),
        }
        print(shape, "same bits as torch:", {k: all(map(torch.equal, v, expected)) for k, v in same.items()})
        kinds = ["floor", "torch", "triton", "compiled"]
        for kind in kinds:
            for _ in range(5):
                loop(kind)
        times = {kind: [] for kind in kinds}
        for _ in range(rounds):  # interleaved, synchronized around each loop of ten substeps
            for kind in kinds:
                torch.cuda.synchronize()
                start = time.perf_counter()
                loop(kind)
                torch.cuda.synchronize()
                times[kind].append((time.perf_counter() - start) / len(coefficients) * 1e6)
        floor = statistics.median(times["floor"])
        for kind in kinds:
            median = statistics.median(times[kind])
            print(f"  {kind:9} {median:7.1f} us per substep ({median / floor:.3f} floors; min {min(times[kind]):.1f} us)")


if __name__ == "__main__":
    main()
