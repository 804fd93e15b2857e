"""Where one pipeline's training step spends its time: ``torch.profiler`` over a window of real steps.

Runs the pipeline through the real engine (``RunContext`` + Lightning ``Trainer``, as ``threefold run``),
lets ``--warmup`` steps pass, then profiles ``--steps`` steps (CPU and, on a GPU, CUDA activity) and prints:
- the step time without the profiler (median of the warm-up steps after the first 5) and with it, both as
  the time inside a training batch and as the period from one batch's start to the next (which adds what
  runs between batches: epoch ends, checkpoint checks, data loading in the main process);
- the operators with the most self CUDA time and the most self CPU time (``key_averages`` tables);
- host-device synchronisations per step (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
  ``cudaMemcpy*`` from device to host: each stops the host from queueing kernels ahead), and CUDA kernel
  launches per step.
The process exits when the window is done (the pipeline's evaluation is not profiled).

    python benchmarks/train_step_profile.py qm9-uni3dar --warmup 30 --steps 10 trainer.batch_size=256 ...
    python benchmarks/train_step_profile.py qm9-uni3dar --device cpu --warmup 6 --steps 3     # checks the path
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
            "cudaMemcpyAsync")


def _callback(warmup: int, steps: int, cuda: bool, rows: int, out):
    import lightning as L
    import torch
    from torch.profiler import ProfilerActivity, profile

    class StepProfile(L.Callback):
        def __init__(self) -> None:
            self.batches, self.t0, self.times, self.periods, self.prof = 0, None, [], [], None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            if self.batches == warmup:
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                self.prof = profile(activities=acts)
                self.prof.__enter__()
            now = time.perf_counter()
            if self.t0 is not None:
                self.periods.append(now - self.t0)
            self.t0 = now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            self.batches += 1
            if self.batches == warmup + steps:
                self.prof.__exit__(None, None, None)
                self.report()
                out.flush()
                os._exit(0)

        def report(self) -> None:
            for name, xs in (("inside a batch", self.times), ("batch start to batch start", self.periods)):
                plain, profiled = xs[5:warmup - 1] or xs[:warmup - 1], xs[warmup:]
                print(f"step, {name}: median {1e3 * statistics.median(plain):.1f} ms without the profiler "
                      f"({len(plain)} steps), {1e3 * statistics.median(profiled):.1f} ms with it ({len(profiled)})",
                      file=out)
            events = self.prof.key_averages()
            if cuda:
                print("\n## self CUDA time (whole window)\n", file=out)
                print(events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60), file=out)
            print("\n## self CPU time (whole window)\n", file=out)
            print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60), file=out)
            counts = {e.key: e.count for e in events}
            syncs = {k: counts[k] / steps for k in SYNC_OPS if k in counts}
            print("\nper step: " + ", ".join(f"{k} {v:g}" for k, v in syncs.items()), file=out)
            launches = sum(v for k, v in counts.items() if k in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
            print(f"per step: {launches / steps:g} kernel launches", file=out)

    return StepProfile()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pipeline")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--warmup", type=int, default=30, help="steps before the profiled window")
    p.add_argument("--steps", type=int, default=10, help="profiled steps")
    p.add_argument("--rows", type=int, default=25, help="rows of each operator table")
    p.add_argument("--data", default=None, help="the pipeline's --data, if it needs one")
    args = p.parse_intermixed_args(argv)

    import torch

    from threefold.pipelines.config import resolve_config
    from threefold.pipelines.engine import RunContext
    from threefold.pipelines.registry import get_pipeline

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (use --device cpu)")
    pipe = get_pipeline(args.pipeline)
    accel = "gpu" if cuda else "cpu"
    overrides = [f"trainer.accelerator={accel}", "trainer.devices=1", "trainer.enable_progress_bar=false",
                 f"trainer.max_steps={args.warmup + args.steps + 5}", *args.overrides]
    cfg = resolve_config(pipe.config_class, pipe.name, overrides=overrides)
    print(f"# {pipe.name} training step profile, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}, torch {torch.__version__}")
    print(f"# overrides: {' '.join(overrides)}; warm-up {args.warmup} steps, profiled {args.steps}\n", flush=True)
    run_dir = Path(tempfile.mkdtemp(prefix="step-profile-"))
    ctx = RunContext(pipe.name, run_dir, cfg.trainer, Path(args.data) if args.data else None, False,
                     [_callback(args.warmup, args.steps, cuda, args.rows, sys.stdout)])
    pipe.run(cfg, ctx)
    sys.exit("the run ended before the profiled window was full: lower --warmup/--steps or raise the epochs")


if __name__ == "__main__":
    main()
