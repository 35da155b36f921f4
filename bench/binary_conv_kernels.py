"""Which kernel runs the packed engines' binary convolutions: measured on one 3x3 binary convolution,
64 -> 64 channels, 32x32, side by side in one run (interleaved rounds, medians):

- torch: F.conv2d of ±1 floats (what the model computes), `--threads` threads;
- numpy: numpy 2's vectorised `np.bitwise_count` on XOR-ed packed words (no new dependency), chunked so
  the XOR-ed words stay in cache;
- numba: the engine's kernel (`workloads/rbnn/xnor.py`), one thread and `--threads` threads;
- C: the same loop in C, compiled here with `cc -O3 -march=native` and called through ctypes (what a
  compiled extension would run; skipped without a compiler).

Every kernel computes the same integer sums; the check is against torch's. Times include packing the
activations and reading the windows as the engine does (numpy, numba); the `kernel_only` rows (numba,
C) take the same prepared rows of window words and time the popcount loop alone.

    python bench/binary_conv_kernels.py [--threads 2] [--rounds 7] [--out bench/results/binary_conv_kernels.json]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F

from workloads.rbnn import xnor

C_SOURCE = r"""
#include <stdint.h>
void xnor_counts(const uint64_t *p, const uint64_t *wt, int32_t *out, long n, long kw, long o) {
  for (long i = 0; i < n; i++) {
    int32_t *acc = out + i * o;
    for (long j = 0; j < o; j++) acc[j] = 0;
    for (long k = 0; k < kw; k++) {
      uint64_t a = p[i * kw + k];
      const uint64_t *w = wt + k * o;
      for (long j = 0; j < o; j++) acc[j] += __builtin_popcountll(a ^ w[j]);
    }
  }
}
"""


def numpy_counts(patches: np.ndarray, weights_t: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Σ_k popcount(patches[:, k] XOR weights_t[k]) with numpy ufuncs only."""
    n, words = patches.shape
    out = np.zeros((n, weights_t.shape[1]), np.int32)
    xored = np.empty((chunk, weights_t.shape[1]), np.uint64)
    counts = np.empty((chunk, weights_t.shape[1]), np.uint8)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        for k in range(words):
            np.bitwise_xor(patches[start: start + m, k, None], weights_t[k], out=xored[:m])
            np.bitwise_count(xored[:m], out=counts[:m])
            out[start: start + m] += counts[:m]
    return out


def c_kernel():
    """The C loop as a callable, or None without a compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    folder = Path(tempfile.mkdtemp())
    (folder / "k.c").write_text(C_SOURCE)
    subprocess.run([cc, "-O3", "-march=native", "-shared", "-fPIC", str(folder / "k.c"), "-o", str(folder / "k.so")],
                   check=True)
    lib = ctypes.CDLL(str(folder / "k.so"))
    lib.xnor_counts.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3

    def run(patches, weights_t):
        out = np.empty((len(patches), weights_t.shape[1]), np.int32)
        lib.xnor_counts(patches.ctypes.data, weights_t.ctypes.data, out.ctypes.data, *patches.shape, weights_t.shape[1])
        return out
    return run


def cpu() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return {"model": model, "avx512f": "avx512f" in flags, "avx512_vpopcntdq": "avx512_vpopcntdq" in flags,
            "avx2": "avx2" in flags, "popcnt": "popcnt" in flags, "logical_cores": torch.get_num_threads()}


def measure(batch: int, threads: int, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 32, 32, 64)).astype(np.float32)  # channels last, as the engine holds maps
    signs = np.where(rng.random((64, 3, 3, 64)) < 0.5, -1, 1).astype(np.int8)  # (O, k, k, C)
    conv = xnor.BinaryConv(xnor.pack_weights(signs), signs, 3, 1, 1)
    x_t = torch.from_numpy(np.sign(x).transpose(0, 3, 1, 2).copy())
    w_t = torch.from_numpy(signs.transpose(0, 3, 1, 2).astype(np.float32).copy())
    packed, _ = xnor.pack_signs(x)
    windows = xnor._patches(packed, 3, 1, 1)  # (B, 32, 32, 9 words): the same rows for both kernels alone
    patches = windows.reshape(-1, windows.shape[-1])
    border = conv.border((32, 32))
    c_run = c_kernel()
    default_work = xnor.PARALLEL_WORK

    def engine(parallel_work):
        def run():
            xnor.PARALLEL_WORK = parallel_work
            try:
                return conv(*xnor.pack_signs(x))
            finally:
                xnor.PARALLEL_WORK = default_work
        return run

    def numpy_path():
        rows = xnor._patches(xnor.pack_signs(x)[0], 3, 1, 1)
        dots = (conv.fan_in - 2 * numpy_counts(rows.reshape(-1, rows.shape[-1]), conv.weights_t))
        return dots.reshape(batch, 32, 32, 64) - border

    def numba_kernel_only():
        out = np.empty((batch, 32, 32, 64), np.int32)
        xnor._KERNELS["xnor_conv"][0](windows, conv.weights_t, 1, 1, conv.fan_in, border, out)
        return out

    candidates = {
        "torch_float": lambda: F.conv2d(x_t, w_t, padding=1),
        "numpy_bitwise_count": numpy_path,
        "numba_1_thread": engine(1 << 62),
        f"numba_{threads}_threads": engine(0),
        "numba_1_thread_kernel_only": numba_kernel_only,
    }
    if c_run is not None:
        candidates["c_1_thread_kernel_only"] = lambda: c_run(patches, conv.weights_t)
    expected = F.conv2d(x_t, w_t, padding=1).numpy().transpose(0, 2, 3, 1)
    equal = {}
    for name, run in candidates.items():  # warm-up (numba compiles) and the check
        out = run()
        if name == "torch_float":
            continue
        if name.startswith("c_"):
            out = (conv.fan_in - 2 * out).reshape(expected.shape) - border
        equal[name] = bool(np.array_equal(out, expected))
    times = {name: [] for name in candidates}
    for _ in range(rounds):  # interleaved: every candidate once per round
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    return {name: {"median_ms": 1e3 * medians[name], "min_ms": 1e3 * min(times[name]),
                   "max_ms": 1e3 * max(times[name]), "vs_torch": medians["torch_float"] / medians[name],
                   "equal": equal.get(name, True)} for name in candidates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="bench/results/binary_conv_kernels.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    result = {"cpu": cpu(), "threads": args.threads, "rounds": args.rounds, "numpy": np.__version__,
              "numba": numba.__version__, "torch": torch.__version__, "conv": "3x3, 64->64, 32x32, pad 1",
              "batches": {str(b): measure(b, args.threads, args.rounds) for b in (64, 1)}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"cpu: {result['cpu']['model']} (avx512_vpopcntdq: {result['cpu']['avx512_vpopcntdq']})")
    for batch, rows in result["batches"].items():
        for name, r in rows.items():
            print(f"batch {batch:>2} {name:<24} {r['median_ms']:8.2f} ms (min {r['min_ms']:.2f}, max {r['max_ms']:.2f})"
                  f"  vs torch {r['vs_torch']:5.2f}x  equal={str(r['equal']).lower()}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
