"""The ``threefold`` command line.

    threefold list
    threefold doctor
    threefold run PIPELINE [--data PATH] [--config FILE] [--resume RUN_DIR] [--runs-dir DIR] [key=value ...]
                                          (key=value: config overrides with dotted keys, anywhere after PIPELINE)
    threefold eval PIPELINE --checkpoint CKPT [--data PATH] [key=value ...]
    threefold predict PIPELINE --checkpoint CKPT --input PATH --out PATH
    threefold prepare DATASET --data RAW_ROOT --out PREPARED_ROOT [--workers N] [--shard i/n]
    threefold tokenize --input FILE --out tokens.json [--decode]
    threefold register --moving M --fixed F --out DIR [--checkpoint CKPT | --method bspline|demons]
    threefold report RUN_DIR              (regenerates figures/ and report.md / report.html of a run)

Exit codes: 0 success, 2 usage error, 1 runtime error (one line naming the problem; the full
traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

import threefold
from threefold.datasets.errors import ConfigError, MissingFileError, ThreefoldError

# A DDP launcher re-executes this command in each extra process; these variables make the children
# join the parent's run folder instead of creating their own.
ENV_RUN_DIR = "THREEFOLD_RUN_DIR"
ENV_RESUME = "THREEFOLD_RESUME"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would exit(2) itself; keep one path for usage errors
        raise _UsageError(f"{self.prog}: {message}")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="dataset root (default: the pipeline's embedded generated sample)")
    p.add_argument("--config", type=Path, help="YAML file overriding the shipped config")
    p.set_defaults(accepts_overrides=True)
    p.epilog = "Config overrides: key=value pairs with dotted keys anywhere after the pipeline name, e.g. trainer.max_epochs=5 model.hidden=32."


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="threefold", description="threefold pipelines: LiDAR, point clouds, meshes, brain MRI, molecules, graphs.")
    parser.add_argument("--version", action="version", version=f"threefold {threefold.__version__}")
    parser.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    sub.add_parser("list", help="list pipelines and datasets")
    sub.add_parser("doctor", help="print versions, extras, CUDA and spconv status; fail on conflicting installs")

    p = sub.add_parser("run", help="train, evaluate and report a pipeline")
    p.add_argument("pipeline")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run folders go (default: ./runs)")
    _add_data_args(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint")
    p.add_argument("pipeline")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    _add_data_args(p)

    p = sub.add_parser("predict", help="write predictions for a file or a folder in the dataset's layout")
    p.add_argument("pipeline")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("report", help="regenerate the figures and report.md / report.html of a finished run")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")

    p = sub.add_parser("tokenize", help="Uni-3DAR octree tokens of a structure (.sdf/.mol/.xyz/.cif/.pdb), or --decode them back")
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--decode", action="store_true", help="tokens JSON -> .xyz / .cif / .pdb")

    p = sub.add_parser("register", help="register two NIfTI brain volumes (affine + deformable), outputs in the fixed geometry")
    p.add_argument("--moving", type=Path, required=True, help="moving volume, e.g. T1w (.nii / .nii.gz)")
    p.add_argument("--fixed", type=Path, required=True, help="fixed volume, e.g. mean b0 (.nii / .nii.gz)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--checkpoint", type=Path, help="weights of an hcp-nestedmorph / hcp-voxelmorph run (default: classical)")
    p.add_argument("--method", default="bspline", choices=["bspline", "demons", "classical"],
                   help="classical deformable step without --checkpoint (classical = bspline)")
    p.add_argument("--size", type=int, default=64, help="training grid, voxels per axis (multiple of 32)")
    p.add_argument("--prealign", default="rigid", choices=["rigid", "affine", "none"])
    p.add_argument("--moving-mask", type=Path)
    p.add_argument("--fixed-mask", type=Path)
    p.add_argument("--iterations", type=int, help="classical optimiser iterations")

    p = sub.add_parser("prepare", help="preprocess a dataset into a cache folder")
    p.add_argument("dataset")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workers", type=int, help="worker processes (default: min(4, CPU count); 1 = in-process)")
    p.add_argument("--shard", default="0/1", metavar="i/n",
                   help="compute only shard i of n (item j of the sorted list belongs to shard j %% n), "
                        "to spread one dataset over n machines")
    return parser


def _cmd_list() -> int:
    from threefold.datasets.registry import list_datasets
    from threefold.pipelines.registry import _UNAVAILABLE, list_pipelines

    pipelines = list_pipelines()
    print("Pipelines:")
    width = max((len(p.name) for p in pipelines), default=10)
    for p in pipelines:
        print(f"  {p.name:<{width}}  {p.description}")
    for mod, why in _UNAVAILABLE.items():
        if why != "not written yet":
            print(f"  (unavailable: {mod}: {why})")
    datasets = list_datasets()
    print("Datasets:")
    width = max((len(d.name) for d in datasets), default=10)
    for d in datasets:
        print(f"  {d.name:<{width}}  [{d.modality}] {d.description}")
    return 0


def _context(pipeline: str, args: argparse.Namespace, trainer_cfg: Any, run_dir: Path, resume: bool):
    from threefold.pipelines.engine import RunContext

    data = args.data.resolve() if getattr(args, "data", None) else None
    if data is not None and not data.exists():
        raise MissingFileError(f"--data {data} does not exist")
    return RunContext(pipeline, run_dir, trainer_cfg, data, resume)


def external_launch(env: Any = None) -> tuple[int, str] | None:
    """``(global rank, job name)`` when torchrun or SLURM's srun started this process as one rank of
    several (each rank then runs the whole command line itself), else ``None``. The job name
    (``torchrun-<rdzv id>``, ``slurm-<job id>.<step id>``) names the run folder, which every rank
    can compute without talking to the others; Lightning picks the same launchers up
    (``TorchElasticEnvironment``, ``SLURMEnvironment``)."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env and "RANK" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        return int(env["RANK"]), f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    if "SLURM_PROCID" in env and "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), f"slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
    return None


def _cmd_run(args: argparse.Namespace) -> int:
    from threefold.pipelines.config import dump_config, read_yaml, resolve_config
    from threefold.pipelines.engine import new_run_dir, write_metrics
    from threefold.pipelines.registry import get_pipeline

    pipe = get_pipeline(args.pipeline)
    if args.data is not None and not args.data.exists():
        raise MissingFileError(f"--data {args.data} does not exist")
    inherited = os.environ.get(ENV_RUN_DIR)
    launched = None if inherited else external_launch()
    # ranks other than 0 train and evaluate but leave config, metrics and report to rank 0
    secondary = bool(inherited) or (launched is not None and launched[0] != 0)
    if inherited:  # a DDP child process: same folder and mode as its parent
        run_dir, resume = Path(inherited), os.environ.get(ENV_RESUME) == "1"
        cfg = resolve_config(pipe.config_class, overrides=read_yaml(run_dir / "config.yaml"))
    elif args.resume:
        run_dir, resume = args.resume.resolve(), True
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: not a run folder (no config.yaml)")
        if args.overrides or args.config:
            raise ConfigError("--resume continues a run with its stored config; drop the overrides and --config")
        cfg = resolve_config(pipe.config_class, overrides=read_yaml(run_dir / "config.yaml"))
    elif launched is not None:  # torchrun / srun: every rank resolves the same command line itself
        cfg = resolve_config(pipe.config_class, pipe.name, args.config, args.overrides)
        run_dir, resume = (args.runs_dir / pipe.name / launched[1]).resolve(), False
        if not secondary and (run_dir / "metrics.json").exists():
            raise ConfigError(f"run folder {run_dir} of job {launched[1]} holds a finished run; give the job another "
                              "id (torchrun --rdzv-id) or resume it with --resume")
        run_dir.mkdir(parents=True, exist_ok=True)
        if not secondary:
            dump_config(cfg, run_dir / "config.yaml")
    else:
        cfg = resolve_config(pipe.config_class, pipe.name, args.config, args.overrides)
        run_dir, resume = new_run_dir(args.runs_dir, pipe.name).resolve(), False
        dump_config(cfg, run_dir / "config.yaml")
    if args.data is None and not secondary and (run_dir / "data_path.txt").is_file():
        args.data = Path((run_dir / "data_path.txt").read_text().strip())
    elif args.data is not None and not secondary:
        (run_dir / "data_path.txt").write_text(str(args.data.resolve()))
    ctx = _context(pipe.name, args, cfg.trainer, run_dir, resume)
    saved = {k: os.environ.get(k) for k in (ENV_RUN_DIR, ENV_RESUME)}
    os.environ[ENV_RUN_DIR], os.environ[ENV_RESUME] = str(run_dir), "1" if resume else "0"
    try:
        metrics = pipe.run(cfg, ctx)
    finally:  # in-process callers (tests, notebooks) must not look like DDP children afterwards
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not secondary:
        write_metrics(run_dir / "metrics.json", metrics)
        _print_summary(metrics)
        print(f"report: {_figures_and_report(pipe, cfg, run_dir, metrics)}")
        print(f"run folder: {run_dir}")
    return 0


def _figures_and_report(pipe: Any, cfg: Any, run_dir: Path, metrics: dict[str, Any]) -> Path:
    """The pipeline's figures, then the report; without matplotlib the report says figures were skipped."""
    from threefold.datasets.errors import MissingExtraError
    from threefold.pipelines.report import write_report

    notes = []
    try:
        pipe.figures(cfg, run_dir, metrics)
    except MissingExtraError as exc:
        notes.append(f"figures skipped: {exc}")
    return write_report(run_dir, notes)[1]


def _cmd_report(args: argparse.Namespace) -> int:
    from threefold.pipelines.config import read_yaml, resolve_config
    from threefold.pipelines.registry import get_pipeline
    from threefold.pipelines.report import read_metrics, write_report

    run_dir = args.run_dir.resolve()
    metrics = read_metrics(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():  # e.g. an `eval` folder: nothing to redraw the figures from
        _, page = write_report(run_dir, [f"figures not regenerated: {config} does not exist"])
    else:
        pipe = get_pipeline(metrics.get("pipeline") or run_dir.parent.name)
        cfg = resolve_config(pipe.config_class, overrides=read_yaml(config))
        page = _figures_and_report(pipe, cfg, run_dir, metrics)
    print(f"report: {page}")
    return 0


def _print_summary(metrics: dict[str, Any]) -> None:
    for key, value in metrics.items():
        if isinstance(value, (int, float, str)):
            print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from threefold.pipelines.config import resolve_config
    from threefold.pipelines.engine import new_run_dir, write_metrics
    from threefold.pipelines.registry import get_pipeline

    pipe = get_pipeline(args.pipeline)
    cfg = resolve_config(pipe.config_class, pipe.name, args.config, args.overrides)
    inherited = os.environ.get(ENV_RUN_DIR)  # a DDP child (trainer.devices=N): the parent's eval folder
    launched = None if inherited else external_launch()
    if inherited:
        run_dir = Path(inherited)
    elif launched is not None:  # torchrun / srun ranks: one folder named after the job
        run_dir = (args.runs_dir / f"{pipe.name}-eval" / launched[1]).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = new_run_dir(args.runs_dir, f"{pipe.name}-eval").resolve()
    saved = {k: os.environ.get(k) for k in (ENV_RUN_DIR, ENV_RESUME)}
    os.environ[ENV_RUN_DIR], os.environ[ENV_RESUME] = str(run_dir), "0"
    try:
        metrics = pipe.evaluate(cfg, _context(pipe.name, args, cfg.trainer, run_dir, False), args.checkpoint)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not inherited and (launched is None or launched[0] == 0):
        write_metrics(run_dir / "metrics.json", metrics)
        _print_summary(metrics)
        print(f"run folder: {run_dir}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from threefold.pipelines.config import resolve_config
    from threefold.pipelines.registry import get_pipeline

    pipe = get_pipeline(args.pipeline)
    if not args.input.exists():
        raise MissingFileError(f"--input {args.input} does not exist")
    cfg = resolve_config(pipe.config_class, pipe.name)
    pipe.predict(cfg, args.checkpoint, args.input, args.out)
    print(f"predictions written to {args.out}")
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from threefold.pipelines.uni3dar import tokenize_command

    print(f"written: {tokenize_command(args.input, args.out, args.decode)}")
    return 0


#: `threefold prepare DATASET`: the function that fills a cache folder from a raw dataset root, called
#: as ``f(data, out, workers=..., shard=(i, n), progress=...)`` and returning the counts of
#: :func:`threefold.datasets.prepare_runner.run_prepare`. Steps compute features with code of several
#: layers (RAPiD rows live in `geometry`, tokens in `science`), so this layer names them.
PREPARE_STEPS: dict[str, tuple[str, str]] = {
    "semantickitti": ("threefold.geometry.rapid.prepare", "prepare_rapid_features"),
    "brats": ("threefold.datasets.brats_prepare", "prepare_brats_cases"),
    "qm9": ("threefold.science.qm9_tokens", "prepare_qm9_tokens"),
}


def _cmd_register(args: argparse.Namespace) -> int:
    from threefold.pipelines.register import register_files

    if args.checkpoint is not None and args.method != "bspline":
        raise _UsageError("threefold register: --checkpoint and --method are exclusive")
    metrics = register_files(args.moving, args.fixed, args.out, checkpoint=args.checkpoint,
                             method="bspline" if args.method == "classical" else args.method, size=args.size,
                             prealign=args.prealign, moving_mask=args.moving_mask, fixed_mask=args.fixed_mask,
                             iterations=args.iterations)
    _print_summary(metrics)
    print(f"written to {args.out}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    import importlib

    from threefold.datasets.prepare_runner import parse_shard
    from threefold.datasets.registry import get_dataset

    try:
        shard = parse_shard(args.shard)
    except ConfigError as exc:
        raise _UsageError(f"threefold prepare: {exc}") from None
    if args.workers is not None and args.workers < 1:
        raise _UsageError(f"threefold prepare: --workers {args.workers}; expected at least 1")
    get_dataset(args.dataset)  # an unknown name fails with the list of datasets
    if args.dataset not in PREPARE_STEPS:
        raise ConfigError(f"dataset {args.dataset!r} reads its raw files directly and needs no `prepare` step "
                          f"(datasets with one: {', '.join(sorted(PREPARE_STEPS))})")
    if not args.data.exists():
        raise MissingFileError(f"--data {args.data} does not exist")
    module, function = PREPARE_STEPS[args.dataset]
    counts = getattr(importlib.import_module(module), function)(args.data, args.out, workers=args.workers, shard=shard,
                                                                progress=True)
    print(f"prepare {args.dataset} shard {shard[0]}/{shard[1]}: {counts['shard_items']} of {counts['items']} items, "
          f"{counts['computed']} computed, {counts['skipped']} skipped (already cached), "
          f"{counts['seconds']:.1f} s, {counts['items_per_s']:.2f} items/s -> {args.out}")
    return 0


def _quiet_lightning() -> None:
    """Lightning's INFO lines (device summary, logger tips, 100%-of-batches notes) drown the run's own
    output; warnings and errors still show, and ``--debug`` restores everything."""
    import logging
    import warnings

    import lightning  # noqa: F401  (its import sets its loggers to INFO; override afterwards)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    parser = build_parser()
    try:
        # Overrides (key=value) may stand anywhere after the pipeline name, also after options, which
        # argparse's positionals cannot express: collect them from what the parser leaves over.
        args, rest = parser.parse_known_args(argv)
        args.overrides = [a for a in rest if "=" in a and not a.startswith("-")]
        unknown = [a for a in rest if a not in args.overrides]
        if unknown or (args.overrides and not getattr(args, "accepts_overrides", False)):
            raise _UsageError(f"threefold: unrecognized arguments: {' '.join(unknown or args.overrides)}")
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "list":
            return _cmd_list()
        if not debug and args.command in ("run", "eval", "predict", "report"):
            _quiet_lightning()
        if args.command == "doctor":
            from threefold.pipelines.doctor import doctor

            return doctor()
        return {"run": _cmd_run, "eval": _cmd_eval, "predict": _cmd_predict, "prepare": _cmd_prepare,
                "report": _cmd_report, "tokenize": _cmd_tokenize, "register": _cmd_register}[args.command](args)
    except _UsageError as exc:
        print(f"usage error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ThreefoldError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 — the CLI's contract is one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
