"""`bitfleet run | sweep | submit | logs | stop | status | validate | eval | report | export | list | data`:
parse the command line and delegate."""
from __future__ import annotations

import argparse
import json
import os
import sys

import bitfleet
from bitfleet import console
from bitfleet.errors import SpecError, failure_line, one_line
from bitfleet.paths import data_path

STOPPED = 143  # 128 + SIGTERM: stopped as asked, at a checkpoint


def main(argv: list[str] | None = None) -> int:
    """Run a command. A spec error exits 2 and any other failure 1, each with one line on stderr (and the
    traceback with -v); a stop asked by SIGTERM exits 143 and Ctrl+C 130."""
    console.spec_warnings_on_one_line()
    args = _parser().parse_args(argv)
    console.setup(args.verbosity)
    try:
        return args.command(args) or 0
    except SpecError as exc:
        print(f"bitfleet: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitfleet: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user; the traceback with -v
        if console.verbose():
            raise
        print(f"bitfleet: error: {failure_line(exc)}", file=sys.stderr)
        return 1


def cmd_validate(args) -> int:
    from bitfleet.resolve import load_spec  # imports torch: not for the commands that only talk to a cluster

    spec = load_spec(args.spec, args.override)
    if args.print:  # the resolved spec, every default filled in: what `run` would run
        import yaml

        print(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    print(f"{args.spec}: ok ({spec.workload}, {getattr(spec.model, 'arch', '')}, run {spec.name} -> {spec.run_dir})")
    for stage in spec.stages:
        needs = f" after {', '.join(stage.needs)}" if stage.needs else ""
        print(f"  stage {stage.name}: {stage.task or 'training run'}{needs}")
    return 0


def cmd_run(args) -> int:
    spec = _load_for_a_start(args)  # validated before any Ray call
    from bitfleet.engine import preemption
    from bitfleet.scheduler import lock

    with lock.hold(spec.storage_path, spec.name), preemption.driver_stops_on_sigterm():  # one driver per run folder
        return _run(spec, args)


def _run(spec, args) -> int:
    from bitfleet.engine.preemption import Stopped
    from bitfleet.scheduler import launch, pipeline

    try:
        if spec.stages:
            records = pipeline.run_pipeline(spec, address=args.address)
            for name, record in records.items():
                print(f"[{spec.name}] stage {name}: {record['state']} -> {record['run_dir']}")
            return 0
        launch.run_training(spec, address=args.address)  # prints its summary
    except pipeline.StageFailed as exc:
        print(f"bitfleet: {failure_line(exc) if not console.verbose() else exc}", file=sys.stderr)
        return 1
    except Stopped as exc:  # SIGTERM to this driver: the workers checkpointed and stopped
        print(f"bitfleet: {exc}", file=sys.stderr)
        return STOPPED
    except SpecError:  # found once the cluster answers (a storage path some node cannot see): exit 2 in main
        raise
    except Exception as exc:  # noqa: BLE001 - Ray's TrainingFailedError and the like: which run, and why
        if console.verbose():
            raise
        print(f"bitfleet: run {spec.name} failed: {failure_line(exc)}", file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args) -> int:
    spec = _load_for_a_start(args)  # the sweep section too: paths, ranges, scheduler options
    if spec.sweep is None:
        raise SpecError(f"sweep: {args.spec} has no sweep section (see the README's Sweeps)")
    from bitfleet.engine import preemption
    from bitfleet.scheduler import lock, sweep

    try:
        with lock.hold(spec.storage_path, spec.name), preemption.driver_stops_on_sigterm():
            summary = sweep.run_sweep(spec, address=args.address)
    except preemption.Stopped as exc:  # SIGTERM to this driver: the trials checkpointed and stopped
        print(f"bitfleet: {exc}", file=sys.stderr)
        return STOPPED
    print(f"best trial {summary['best_trial']}: {summary['best_spec']}")
    return 0


def _load_for_a_start(args):
    """The resolved spec of `run`/`sweep`; with --fresh an existing run of that name is set aside first."""
    from bitfleet.resolve import load_spec, set_aside

    spec = load_spec(args.spec, args.override, fresh=args.fresh)
    if args.fresh:
        from bitfleet.scheduler import lock

        lock.check_unheld(spec.storage_path, spec.name)  # never move a live run's folder
        aside = set_aside(spec)
        if aside:
            print(f"bitfleet: --fresh: the earlier {spec.name} is kept as {aside}", file=sys.stderr)
    return spec


def cmd_submit(args) -> int:
    from bitfleet.scheduler import jobs

    extra_env = jobs.runtime_env(args.runtime_env, args.pip, args.env, args.exclude)
    client = jobs.connect(args.address)  # an address that does not answer fails here, in seconds
    job_id = jobs.submit(args.spec, args.override, client, args.working_dir, extra_env)  # the spec fails before
    address = f" --address {args.address}" if args.address else ""
    print(f"submitted {job_id}", flush=True)
    if args.no_wait:
        print(f"follow it: bitfleet logs {job_id} --follow{address}\nstop it:   bitfleet stop {job_id}{address}")
        return 0
    print(f"bitfleet: following {job_id} (Ctrl+C stops following, not the job)", file=sys.stderr, flush=True)
    return jobs.follow(client, job_id)


def cmd_logs(args) -> int:
    from bitfleet.scheduler import jobs

    client = jobs.connect(args.address)
    job_id = jobs.find(client, args.job)
    if args.follow:
        return jobs.follow(client, job_id)
    print(jobs.logs(client, job_id), end="")
    return 0


def cmd_stop(args) -> int:
    from bitfleet.scheduler import jobs

    client = jobs.connect(args.address)
    return jobs.stop(client, jobs.find(client, args.job), wait=not args.no_wait)


def cmd_list(args) -> int:
    from bitfleet import listing

    print(listing.describe())
    return 0


def cmd_report(args) -> int:
    from bitfleet import report

    out = report.write(args.run_dirs, args.out)
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from bitfleet import export

    result = export.export(args.run_dir, args.out, args.checkpoint)
    print(json.dumps(result, indent=1, default=str))
    return 0


def cmd_eval(args) -> int:
    if args.engine:
        return engine_eval(args)
    from bitfleet import evaluation

    result = evaluation.evaluate_run(args.path, args.split, args.override, args.out)
    print(evaluation.describe(result))
    return 0


def engine_eval(args) -> int:
    """`bitfleet eval --engine FILE`: an exported engine on a split of its data set (no run folder)."""
    from bitfleet import export

    result = export.evaluate_engine(args.engine, args.split, args.override, args.out)
    print(json.dumps(result, indent=1))
    return 0


def cmd_data_download(args) -> int:
    from bitfleet import data

    try:
        data.download(args.name, args.root)
    except Exception as exc:  # noqa: BLE001 - offline machines: say so in one line
        print(f"bitfleet: cannot download {args.name} into {args.root}: {exc}\n"
              f"copy the files there by hand; `bitfleet validate` says which ones it expects", file=sys.stderr)
        return 1
    return 0


def cmd_status(args) -> int:
    from bitfleet import status

    if args.watch:
        return status.watch(args.address, args.watch)
    print(status.status(args.address))
    return 0


def cmd_data_prepare(args) -> int:
    from bitfleet.data import prepare

    try:
        if args.name == "imagenet":
            if not args.val_labels:
                raise ValueError("--val-labels: imagenet needs the validation labels file "
                                 "(Kaggle's LOC_val_solution.csv, or lines of `<file> <wnid>`)")
            moved = prepare.prepare_imagenet(args.root, args.val_labels)
        else:
            moved = prepare.prepare_tinyimagenet(args.root)
    except (ValueError, FileNotFoundError) as exc:
        print(f"bitfleet: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    print(f"moved {moved} validation images of {args.root} into class folders")
    return 0


def cmd_data_check(args) -> int:
    from bitfleet.data import prepare

    report = prepare.check(args.root, args.workers)
    for split, counts in report["splits"].items():
        print(f"{split}: {counts['classes']} classes, {counts['images']} images")
    for path, error in report["unreadable"].items():
        print(f"unreadable: {path}: {error}")
    bad = len(report["unreadable"])
    print(f"{bad} unreadable image(s){'; runs leave them out' if bad else ''} "
          f"(recorded in {args.root}/bitfleet-check.json)")
    return 1 if bad else 0


def cmd_data_synth(args) -> int:
    from bitfleet.data import synthetic

    path = synthetic.write(args.name, args.root, n_train=args.train, n_test=args.test, seed=args.seed)
    print(f"wrote synthetic {args.name} in its real on-disk format under {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitfleet", description=__doc__)
    parser.add_argument("--version", action="version", version=f"bitfleet {bitfleet.__version__}")
    common = argparse.ArgumentParser(add_help=False)  # every command's -q/-v
    loudness = common.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=console.QUIET,
                          default=console.NORMAL, help="warnings, errors and the final summary only")
    loudness.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=console.VERBOSE,
                          help="also Ray's own output from every process, debug lines and tracebacks")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(subparsers, name, **kwargs):
        return subparsers.add_parser(name, parents=[common], **kwargs)

    def spec_command(name, func, help_):
        p = command(sub, name, help=help_)
        p.add_argument("spec", help="YAML workload spec")
        p.add_argument("-o", "--override", action="append", default=[], metavar="PATH=VALUE",
                       help="dotted override, e.g. -o train.epochs=1 (repeatable)")
        p.set_defaults(command=func)
        return p

    validate = spec_command("validate", cmd_validate, "check a spec without starting anything")
    validate.add_argument("--print", action="store_true", help="print the resolved spec (defaults filled in)")
    run = spec_command("run", cmd_run, "run a spec as a Ray Train job, or its stages as a pipeline "
                       "(a local Ray when no cluster is given)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray)")
    run.add_argument("--fresh", action="store_true", help="start anew: an existing run of that name is moved "
                     "aside (to NAME.<UTC time>), not resumed")
    sweep = spec_command("sweep", cmd_sweep, "run the spec's `sweep:` as a Ray Tune search (resumes if it ran before)")
    sweep.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray)")
    sweep.add_argument("--fresh", action="store_true", help="start the sweep anew, its earlier folder moved aside")
    submit = spec_command("submit", cmd_submit, "run the spec (a sweep spec: its sweep) as a Ray Job: streams "
                          "its logs and exits with its code, like `ray job submit`")
    _address_option(submit)
    submit.add_argument("--working-dir", help="uploaded as the job's working directory (default: the runtime "
                        "env file's, else .)")
    submit.add_argument("--no-wait", action="store_true", help="return once submitted; follow with `bitfleet logs`")
    submit.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                        help="a package the job installs, e.g. --pip mlflow>=2.16 (repeatable)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable of the job (repeatable)")
    submit.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="a gitignore-style pattern left out of the upload, besides the defaults (repeatable)")
    submit.add_argument("--runtime-env", metavar="FILE", help="a runtime env YAML file, as `ray job submit` reads "
                        "one; the flags above add to it")
    logs = command(sub, "logs", help="a submitted job's logs (by submission id, or the newest job of a run)")
    logs.add_argument("job", metavar="ID", help="submission id (bitfleet-<run>[-N]) or run name")
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the job ends; exit with its code")
    _address_option(logs)
    logs.set_defaults(command=cmd_logs)
    stop = command(sub, "stop", help="stop a submitted job: its run checkpoints at the next step and stops")
    stop.add_argument("job", metavar="ID", help="submission id (bitfleet-<run>[-N]) or run name")
    stop.add_argument("--no-wait", action="store_true", help="return at once, not when the job has stopped")
    _address_option(stop)
    stop.set_defaults(command=cmd_stop)

    stat = command(sub, "status", help="runs and sweeps alive on a Ray cluster, with their latest metrics")
    stat.add_argument("--address", help="Ray cluster address HEAD:6379 (default: RAY_ADDRESS, else the local "
                      "cluster)")
    stat.add_argument("--watch", nargs="?", type=_seconds, const=5.0, metavar="SECONDS",
                      help="refresh every SECONDS (default 5) until Ctrl+C")
    stat.set_defaults(command=cmd_status)

    listing = command(sub, "list", help="the workloads, the networks each builds and their shipped specs")
    listing.set_defaults(command=cmd_list)

    report = command(sub, "report", help="curves and summary.json of finished runs")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="output folder (default: the first run's folder)")
    report.set_defaults(command=cmd_report)

    exp = command(sub, "export", help="export a finished run's model with its workload's exporter")
    exp.add_argument("run_dir", metavar="RUN_DIR")
    exp.add_argument("--out", required=True, help="output file")
    exp.add_argument("--checkpoint", help="checkpoint folder (default: the run's best)")
    exp.set_defaults(command=cmd_export)

    ev = command(sub, "eval", help="evaluate a run's checkpoint, or an exported engine, on a split of its data")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("path", nargs="?", metavar="RUN_DIR|CHECKPOINT",
                      help="a run folder (its best checkpoint) or one of its checkpoints; a path or a URI")
    what.add_argument("--engine", metavar="FILE", help="an engine file written by `bitfleet export` (no run folder)")
    ev.add_argument("--split", choices=["test", "val", "train"], default="test", help="default: test")
    ev.add_argument("-o", "--override", action="append", default=[], metavar="data.FIELD=VALUE",
                    help="change the recorded data section, e.g. -o data.root=DIR (repeatable)")
    ev.add_argument("--out", help="where to write eval.json (default: into the run's folder, or next to the engine)")
    ev.set_defaults(command=cmd_eval)

    data = command(sub, "data", help="data sets: download, prepare, check, synthetic files")
    data_sub = data.add_subparsers(required=True, metavar="ACTION")
    dl = command(data_sub, "download", help="download with torchvision (needs internet)")
    dl.add_argument("name", choices=["mnist", "cifar10", "cifar100"])
    root_help = "a data set folder; a bare relative one (cifar10) is under $BITFLEET_DATA, else ~/data"
    dl.add_argument("--root", required=True, type=data_path, help=root_help)
    dl.set_defaults(command=cmd_data_download)
    prep = command(data_sub, "prepare", help="sort an official validation folder into class folders")
    prep.add_argument("name", choices=["imagenet", "tinyimagenet"])
    prep.add_argument("root", type=data_path, help=f"{root_help}, holding train/ and val/")
    prep.add_argument("--val-labels", help="imagenet: LOC_val_solution.csv, or lines of `<file> <wnid>`")
    prep.set_defaults(command=cmd_data_prepare)
    chk = command(data_sub, "check", help="count classes/images of a JPEG folder data set, find unreadable files")
    chk.add_argument("root", type=data_path, help=root_help)
    chk.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes (default: all cores)")
    chk.set_defaults(command=cmd_data_check)
    syn = command(data_sub, "synth", help="write a small synthetic data set in the real on-disk format")
    syn.add_argument("name", choices=["mnist", "cifar10", "cifar100", "image_folder", "imagenet", "tinyimagenet"])
    syn.add_argument("root", type=data_path, help=root_help)
    syn.add_argument("--train", type=int, default=512)
    syn.add_argument("--test", type=int, default=128)
    syn.add_argument("--seed", type=int, default=0)
    syn.set_defaults(command=cmd_data_synth)
    return parser


def _address_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="the cluster's dashboard, e.g. http://head:8265 (default: "
                        "RAY_API_SERVER_ADDRESS, else RAY_ADDRESS)")


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
