"""`python -m minielectra.gpu_check`: everything to run once on a machine with an NVIDIA GPU, in under 5 minutes.

1. the GPU tests: pytest -m gpu (every CUDA kernel against the NumPy reference, a whole step, the optimizer on CuPy
   arrays);
2. the training-step benchmark on the cupy backend for the `tiny` and `small` presets (params, optimizer state and
   batch on the GPU; kernels dispatched for CuPy arrays);
3. if PyTorch with CUDA is installed, the same step in PyTorch on CUDA (bench_torch.TorchStep(device="cuda")) for a
   tokens/s ratio; otherwise that column says why it is missing;
4. for each preset, `bench --ops`'s table: each CUDA kernel against the reference as CuPy code, at the step's shapes;
then one short table. Works from a source checkout without `pip install` (the repository root goes on sys.path) and
needs nothing beyond numpy, cupy, nvcc/NVRTC, pytest + hypothesis for step 1, and optionally torch + transformers.

Options: --skip-tests, --steps N (timed steps per benchmark, default 10), --presets tiny,small, --tf32 (TF32 GEMMs in
both steps).
"""

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))



def run_gpu_tests(timeout=180):
    """(ok, summary line) of pytest -m gpu tests in a subprocess."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s"
    lines = [ln for ln in done.stdout.strip().splitlines() if ln.strip()]
    if done.returncode not in (0, 5):
        print(done.stdout[-6000:], done.stderr[-2000:], sep="\n")
    return done.returncode == 0, (lines[-1] if lines else done.stderr.strip()[-200:])


def bench_cupy(preset, steps, warmup=2):
    from minielectra import bench, electra
    from minielectra.config import preset as get_preset

    config, train = get_preset(preset)  # the preset's own batch and sequence length (small: 128 x 128)
    batch, seq = train.batch_size, train.seq_len
    step, params, _ = bench.make_step(config, train, batch, seq)  # on the GPU under the cupy backend; it synchronises
    t = time.perf_counter()
    first_loss = float(step())
    first = time.perf_counter() - t
    for _ in range(max(0, warmup - 1)):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"preset": preset, "batch": batch, "seq": seq, "params_m": electra.count_params(params) / 1e6,
            "first_loss": first_loss, "compile_s": max(0.0, first - med), "s_per_step": med,
            "tokens_per_s": batch * seq / med, "tflop_per_s": bench.model_flops(config, batch, seq) / med / 1e12}


def bench_torch_cuda(preset, steps, warmup=2):
    """tokens/s of the PyTorch step on CUDA, or a string saying why there is none."""
    try:
        import torch
    except ImportError:
        return "torch not installed"
    if not torch.cuda.is_available():
        return "torch has no CUDA"
    from minielectra import bench_torch
    from minielectra.config import preset as get_preset

    config, train = get_preset(preset)
    batch, seq = train.batch_size, train.seq_len
    try:
        step = bench_torch.TorchStep(config, train, batch, seq, device="cuda")
    except ImportError as e:
        return str(e)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return batch * seq / statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minielectra.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--tf32", action="store_true", help="benchmark with TF32 GEMMs (ours and PyTorch's alike)")
    args = ap.parse_args(argv)
    start = time.perf_counter()

    from minielectra import backend

    if not backend.gpu_usable():
        print("gpu_check: no usable CUDA GPU (CuPy missing or no device); nothing to do", file=sys.stderr)
        return 2
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"GPU: {name}, CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}")

    rows = []
    if args.skip_tests:
        rows.append(("GPU tests", "skipped"))
    else:
        ok, summary = run_gpu_tests()
        rows.append(("GPU tests", ("ok: " if ok else "FAILED: ") + summary))
    backend.set_backend("cupy")
    backend.set_tf32(args.tf32)  # the tests above ran in their own process, so no float32 GEMM has run here yet
    print(backend.describe())
    from minielectra import bench
    from minielectra.config import preset as get_preset

    results = []
    for preset in [p for p in args.presets.split(",") if p]:
        r = bench_cupy(preset, args.steps)
        r["torch"] = bench_torch_cuda(preset, args.steps)
        results.append(r)
        config, train = get_preset(preset)
        print(f"\n{preset}, batch {train.batch_size} x {train.seq_len}, per op:")
        print(bench.format_ops(bench.bench_ops(config, train, train.batch_size, train.seq_len)))

    print()
    for label, value in rows:
        print(f"{label:<10} {value}")
    print(f"{'preset':<7} {'batch x seq':>11} {'params M':>8} {'loss@0':>7} {'compile s':>9} {'s/step':>8} "
          f"{'tokens/s':>10} {'TFLOP/s':>7}  vs torch (CUDA)")
    for r in results:
        t = r["torch"]
        vs = f"{r['tokens_per_s'] / t:.2f}x ({t:,.0f} tok/s)" if isinstance(t, float) else f"- ({t})"
        print(f"{r['preset']:<7} {r['batch']:>5} x {r['seq']:<4} {r['params_m']:>8.2f} {r['first_loss']:>7.2f} "
              f"{r['compile_s']:>9.1f} {r['s_per_step']:>8.4f} {r['tokens_per_s']:>10,.0f} {r['tflop_per_s']:>7.2f}  {vs}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0 if all(not v.startswith("FAILED") for _, v in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
