"""The ``vlbench`` command line.

    vlbench run matrix [--config FILE] [--defenses A,B] [--attacks A,B] [--datasets A,B]
                       [--limit N] [--out DIR] [--seed N] [--device cpu|cuda]
                       [--executor local|slurm] [--workers N] [--shard I/N] [--retry-failed]
    vlbench status RESULTS_DIR
    vlbench ls defenses|attacks|datasets|models
    vlbench models fetch NAME[,NAME]|all
    vlbench models check [NAME ...]
    vlbench leaderboard RESULTS_DIR [RESULTS_DIR ...] [--out DIR]
    vlbench compare RESULTS_DIR --defenses A,B
    vlbench audit DEFENSE[,DEFENSE] [--checks FILE] [run matrix's options]
    vlbench validate PLUGIN.py|NAME [--set KEY=VALUE] [--pretrained CHECKPOINT]
    vlbench submit PLUGIN.py|NAME [--protocol FILE] [--baseline RESULTS_DIR] [--like LABEL]
                   [--set KEY=VALUE] [run matrix's options]
    vlbench world pretrain [--force]
    vlbench prepare defense|attack NAME [--set KEY=VALUE]

Bad input (unknown names, malformed YAML, missing data or checkpoints, out-of-range
parameters) prints one line naming the problem and the fix and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from vlbench.errors import UserError
from vlbench.models.precision import PRECISIONS

EPILOG = """examples:
  vlbench run matrix                                   # the synthetic world, default matrix
  vlbench run matrix --attacks none,pgd --limit 200    # a quick subset
  vlbench run matrix --config configs/world.yaml --out runs/mine
  vlbench ls attacks
  vlbench ls models                                    # the model card: released robust CLIPs and bases
  vlbench models fetch robustvlm-fare4-vit-b-32        # download, verified; nothing downloads at run time
  vlbench leaderboard runs/world
  vlbench compare runs/world --defenses tecoa,fare     # paired differences, intervals, p-values
  vlbench run matrix --workers 2                       # two worker processes on this machine
  vlbench run matrix --executor slurm                  # SLURM jobs (executor: section of the config)
  vlbench run matrix --shard 0/4                       # the first quarter of the plan (0/4 ... 3/4)
  vlbench status runs/world                            # done, running, failed, pending
  vlbench audit tecoa,fare                             # gradient-masking checks (configs/audit.yaml)
  vlbench validate my_defense.py                       # a plugin's contract, checked on the world
  vlbench submit my_defense.py --like vanilla --baseline results/world   # its row among the built-ins
  vlbench leaderboard results/world submissions/mine --out merged       # several folders, one page
"""


def _seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers (e.g. 0,1,2)") from None


def _names(text: str) -> list[str]:
    return [part for part in text.replace(" ", ",").split(",") if part]


def _add_plugin_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                        help="load a defense or attack from a single file (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlbench", description=__doc__.splitlines()[0].strip(),
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log skipped cells and cache activity")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run an evaluation")
    run_kinds = run.add_subparsers(dest="what", required=True)
    matrix = run_kinds.add_parser("matrix", help="defenses × attacks × datasets, one result file per cell",
                                  epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    matrix.add_argument("--defenses", type=_names, help="comma-separated defense labels or names")
    matrix.add_argument("--attacks", type=_names, help="comma-separated attack labels or names")
    _add_run_arguments(matrix)

    audit = commands.add_parser("audit", help="gradient-masking checks on defenses (configs/audit.yaml); "
                                "exit status 1 if one fails")
    audit.add_argument("defenses", type=_names, metavar="DEFENSE[,DEFENSE]",
                       help="defense labels of the matrix config (or registered names, default parameters)")
    audit.add_argument("--checks", type=Path, help="audit config (default: the config's checks:, else configs/audit.yaml)")
    _add_run_arguments(audit)
    return _add_more_commands(parser, commands)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a run, shared by ``run matrix`` and ``audit``."""
    parser.add_argument("--config", type=Path, help="matrix YAML (default: the embedded world config)")
    parser.add_argument("--datasets", type=_names, help="comma-separated dataset names")
    parser.add_argument("--limit", type=int, help="evaluate a seeded, fixed subset of N samples")
    parser.add_argument("--out", type=Path, help="results folder (default from the config)")
    parser.add_argument("--seed", type=int, help="the protocol's seed: test subsets and attack randomness")
    parser.add_argument("--training-seeds", type=_seeds, dest="training_seeds",
                        help="train every training defense once per seed, e.g. 0,1,2 (the leaderboard's row is "
                        "their mean, its interval over seeds and test samples)")
    parser.add_argument("--device", help="cpu or cuda")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="forward-pass precision (default fp32; bf16/fp16 only where native)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--model", help="the base model of every row without a base: a model card entry "
                        "(vlbench ls models), or an open_clip architecture with --pretrained")
    parser.add_argument("--pretrained", help="other weights for --model: an open_clip tag, hf-hub:ORG/NAME[/FILE], "
                        "or a checkpoint file or folder (any release format)")
    parser.add_argument("--data-root", type=Path, help="folder holding the datasets (or $VLBENCH_DATA)")
    parser.add_argument("--dataset-root", action="append", default=[], metavar="NAME=PATH",
                        help="where one dataset lives (repeatable)")
    parser.add_argument("--data-workers", type=int, help="DataLoader processes decoding images (default 0)")
    parser.add_argument("--threads", type=int, help="CPU threads per process (default: all cores, or cores/N "
                        "for N workers, or a SLURM job's CPUs)")
    parser.add_argument("--no-cache", action="store_true", help="recompute embeddings")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--executor", choices=["local", "slurm"],
                        help="where cells run (default from the config's executor: section, else local)")
    parser.add_argument("--workers", type=int, help="local worker processes (default 1: sequential)")
    parser.add_argument("--shard", metavar="I/N",
                        help="run only the I-th of N slices of the plan (I from 0), or 'auto' from torchrun/srun")
    parser.add_argument("--retry-failed", action="store_true", help="rerun only the cells recorded as failed")
    parser.add_argument("--no-wait", action="store_true", help="slurm: submit and return (follow with vlbench status)")
    _add_plugin_flag(parser)


def _add_more_commands(parser: argparse.ArgumentParser, commands) -> argparse.ArgumentParser:
    status = commands.add_parser("status", help="a results folder's cells: done, running, failed or pending")
    status.add_argument("results_dir", type=Path)

    ls = commands.add_parser("ls", help="list registered defenses, attacks, datasets or models")
    ls.add_argument("kind", choices=["defenses", "attacks", "datasets", "models"])
    _add_plugin_flag(ls)

    board = commands.add_parser("leaderboard", help="write leaderboard CSV/Markdown/HTML (with figures) from "
                                "results; several folders merge into one page")
    board.add_argument("results_dirs", type=Path, nargs="+", metavar="RESULTS_DIR")
    board.add_argument("--out", type=Path, help="where the merged leaderboard goes (needed for several folders)")

    submit = commands.add_parser("submit", help="validate a defense or attack, run a protocol's matrix with it "
                                 "added, and write a submission folder (cells, submission record, leaderboard)")
    submit.add_argument("target", metavar="PLUGIN.py|NAME", help="a plugin file, or a registered (installed) name")
    submit.add_argument("--protocol", type=Path, help="the matrix config to run (default: the embedded world config)")
    submit.add_argument("--baseline", type=Path, action="append", default=[], metavar="RESULTS_DIR",
                        help="the protocol's results: run only the new plugin's cells and merge with these")
    submit.add_argument("--like", metavar="LABEL", help="a defense: train with this protocol defense's recipe")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter of the submitted plugin, read as YAML (repeatable)")
    _add_run_arguments(submit)

    compare = commands.add_parser("compare", help="two defenses' paired differences, with intervals and p-values")
    compare.add_argument("results_dir", type=Path)
    compare.add_argument("--defenses", required=True, metavar="A,B", help="the two defense labels to compare")

    prepare = commands.add_parser("prepare", help="build (or reuse) what a defense or attack needs before a run "
                                  "(e.g. bert-attack's masked LM), so cluster jobs find it cached")
    prepare.add_argument("kind", choices=["defense", "attack"])
    prepare.add_argument("name")
    prepare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="a plugin parameter, the value read as YAML (repeatable)")
    _add_plugin_flag(prepare)

    validate = commands.add_parser("validate", help="check a plugin file or a registered defense or attack: "
                                   "its declaration, and on the world what it promises; exit status 2 on a failure")
    validate.add_argument("target", metavar="PLUGIN.py|NAME", help="a plugin file, or a registered name")
    validate.add_argument("--pretrained", help="the world CLIP checkpoint to run on (default: the cached one, "
                          "pretrained first if missing)")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="a plugin parameter for the runs on the world, the value read as YAML (repeatable), "
                          "e.g. --set mlm=world")

    models = commands.add_parser("models", help="the model card's weights: fetch them (verified), check what is here")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    fetch = model_commands.add_parser("fetch", help="download model entries into the Hugging Face cache or "
                                      "vlbench's, verified against their sha256 (a cut transfer resumes)")
    fetch.add_argument("names", type=_names, metavar="NAME[,NAME]|all")
    fetch.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="for a built entry (the world CLIP): the precision it is built at")
    fetch.add_argument("--no-progress", action="store_true")
    check = model_commands.add_parser("check", help="per entry: present or missing, size, verified; exit "
                                      "status 1 if a file differs from its entry's sha256")
    check.add_argument("names", nargs="*", metavar="NAME", help="entries to check (default: every entry)")

    world = commands.add_parser("world", help="the synthetic world")
    world_commands = world.add_subparsers(dest="world_command", required=True)
    pretrain = world_commands.add_parser("pretrain", help="pretrain (or reuse) the world's tiny CLIP")
    pretrain.add_argument("--force", action="store_true", help="pretrain again even if cached")
    pretrain.add_argument("--precision", choices=PRECISIONS, default="fp32",
                          help="forward-pass precision (default fp32; bf16/fp16 only where native)")
    pretrain.add_argument("--release", action="store_true",
                          help="write the default pretraining and the world MLM into the package as the shipped "
                          "release (vlbench/world/released/) and print the sha256 for models.yaml")
    return parser


def default_config_path() -> Path:
    from vlbench.store.paths import builtin_root

    return builtin_root() / "configs" / "world.yaml"


def matrix_config(args: argparse.Namespace):
    from vlbench.run.matrix import MatrixConfig, read_config, select

    path = args.config or default_config_path()
    if args.config is not None and not args.config.is_file():
        raise UserError(f"config file {args.config} does not exist", "check the --config path")
    cfg = MatrixConfig.from_dict(read_config(path), str(path))
    if args.defenses:
        cfg.defenses = select(cfg.defenses, args.defenses)
    if args.attacks:
        cfg.attacks = select(cfg.attacks, args.attacks)
    for key in ("datasets", "limit", "seed", "training_seeds", "device", "batch_size", "model", "pretrained",
                "precision", "data_workers", "threads"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    if args.out is not None:
        cfg.out = str(args.out)
    if args.executor is not None:
        cfg.executor.name = args.executor
    if args.workers is not None:
        cfg.executor.workers = args.workers
        cfg.executor.validate()
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"device {cfg.device!r} requested but no CUDA GPU is available", "use --device cpu")
    elif cfg.device != "cpu":
        raise UserError(f"unknown device {cfg.device!r}", "use cpu or cuda[:N]")
    return cfg


def _prepare_run(args: argparse.Namespace):
    """The matrix config of a run command, with its data roots and plugin files loaded."""
    import os

    from vlbench import plugins
    from vlbench.data import datasets

    if args.data_root:
        os.environ["VLBENCH_DATA"] = str(args.data_root)
    for item in args.dataset_root:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--dataset-root {item!r} is not NAME=PATH", "write e.g. --dataset-root cifar10=/data/cifar")
        datasets.root_overrides[name] = Path(path)
    plugins.load_files(args.plugin)
    return matrix_config(args)


def _execute(cfg, args: argparse.Namespace):
    """Run ``cfg``'s cells on the executor the config and flags choose; returns the plan, or
    None when cells were submitted without waiting."""
    from vlbench.data import datasets
    from vlbench.reporting.leaderboard import write_leaderboard
    from vlbench.run.matrix import RunFailed, Selection, parse_shard, run_matrix
    from vlbench.store.embeddings import EmbeddingCache

    selection = Selection(shard=parse_shard(args.shard) if args.shard else None, retry_failed=args.retry_failed)
    report = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    shared = dict(selection=selection, plugin_files=[str(Path(p).resolve()) for p in args.plugin],
                  roots={k: str(v.resolve()) for k, v in datasets.root_overrides.items()},
                  cache_enabled=not args.no_cache)
    if cfg.executor.name == "slurm" and args.shard:
        raise UserError("--shard and --executor slurm do not combine", "the slurm executor spreads the plan itself")
    try:
        if cfg.executor.name == "slurm":
            from vlbench.run.slurm import run_on_slurm

            plan = run_on_slurm(cfg, report, wait=not args.no_wait, **shared)
            return None if args.no_wait else plan
        if cfg.executor.workers > 1:
            from vlbench.run.workers import run_workers

            return run_workers(cfg, cfg.executor.workers, report, **shared)
        return run_matrix(cfg, progress=not args.no_progress, cache=EmbeddingCache(enabled=not args.no_cache),
                          report=report, selection=selection)
    except RunFailed:
        write_leaderboard(cfg.out)  # of the cells that finished
        raise


def _summary(cfg, plan) -> None:
    print(f"{len(plan.cells)} cells in {cfg.out}/cells"
          + (f"; {len(plan.skipped)} skipped, where the attack is not defined for the task (-v lists them)"
             if plan.skipped else ""), file=sys.stderr)


def _audit(cfg, audit, args: argparse.Namespace, defenses=None) -> dict | None:
    """Run the audit's cells and checks for ``defenses`` (default: the config's); None when
    its cells were submitted without waiting."""
    from vlbench.reporting.checks import format_report
    from vlbench.reporting.leaderboard import write_leaderboard
    from vlbench.run.audit import audit_matrix, decide

    audited = audit_matrix(cfg, audit, defenses, limit=args.limit)
    plan = _execute(audited, args)
    if plan is None:
        return None
    _summary(audited, plan)
    write_leaderboard(audited.out)
    labels = [spec.label for spec in audited.defenses]
    report = decide(cfg, audit, labels)
    print(format_report(report, labels))
    return report


def cmd_run_matrix(args: argparse.Namespace) -> int:
    from vlbench.reporting.leaderboard import record_command, write_leaderboard
    from vlbench.run.audit import AuditConfig

    cfg = _prepare_run(args)
    audit = AuditConfig.load(cfg.checks) if cfg.checks else None
    plan = _execute(cfg, args)
    if plan is None:
        return 0
    record_command(cfg.out, args.argv)  # once its cells exist: bad input leaves no folder behind
    _summary(cfg, plan)
    if audit is not None and _audit(cfg, audit, args) is None:
        return 0
    write_leaderboard(cfg.out, print_markdown=True)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from vlbench.reporting.leaderboard import write_leaderboard
    from vlbench.run.audit import AuditConfig
    from vlbench.run.matrix import select

    defenses, args.defenses, args.attacks = args.defenses, None, None
    cfg = _prepare_run(args)
    if args.checks is not None:
        audit = AuditConfig.load(str(args.checks))
    else:
        audit = AuditConfig.load(cfg.checks or True)
    report = _audit(cfg, audit, args, select(cfg.defenses, defenses))
    if report is None:
        return 0
    if (Path(cfg.out) / "cells").is_dir():
        write_leaderboard(cfg.out)  # its rows now carry the audit's flags
    return 1 if any(entry["failed"] for entry in report.values()) else 0


def cmd_ls(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    if args.kind == "datasets":
        from vlbench.data.datasets import dataset_names, get_spec

        rows = [(n, s.task, s.reference or "", s.description) for n in dataset_names() for s in [get_spec(n)]]
        print(tabulate(rows, headers=["name", "task", "reference", "description"]))
        return 0
    if args.kind == "models":
        from vlbench.models.card import card

        def weights(spec) -> str:  # a URL shown by its host and file name, as people recognise it
            text = spec.weights.describe()
            return (text.split("/")[2] + "/…/" + text.rsplit("/", 1)[1]) if spec.weights.url else text

        entries = card()
        rows = [(name, spec.arch, f"{spec.format}" + (f", {spec.towers} on {spec.base}" if spec.base else ""),
                 weights(spec), spec.source + (" ⚑" if spec.unconfirmed else "")) for name, spec in entries.items()]
        print(tabulate(rows, headers=["name", "arch", "release", "weights", "source"],
                       maxcolwidths=[None, None, 34, 44, 56]))
        print("\n⚑ not confirmed from a file read:\n" + "\n".join(
            f"  {name}: {spec.unconfirmed}" for name, spec in entries.items() if spec.unconfirmed))
        return 0
    from vlbench import api, plugins

    api.discover(args.plugin)
    registry = api.registry_for(args.kind)
    rows = []
    for name in registry.names():
        try:
            cls = registry.get(name)
        except Exception as exc:  # a broken third-party plugin is reported, the rest still listed
            if name in plugins.builtin_names[args.kind]:
                raise
            warnings.warn(f"skipping plugin {name}: {type(exc).__name__}: {exc}", plugins.PluginWarning)
            continue
        if args.kind == "attacks":
            model = f"{cls.modality}; {', '.join(cls.tasks)}"
            rows.append((name, cls.paper, model, cls.description))
        else:
            rows.append((name, cls.paper, cls.description))
    headers = ["name", "paper", "threat model; tasks", "description"] if args.kind == "attacks" \
        else ["name", "paper", "description"]
    print(tabulate(rows, headers=headers))
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from vlbench.reporting.leaderboard import write_leaderboard

    write_leaderboard(args.results_dirs, print_markdown=True, out=args.out)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    import shlex

    from vlbench.reporting.leaderboard import record_command, write_leaderboard
    from vlbench.run.submit import add_plugin, submission_record, write_submission
    from vlbench.run.validate import plugins_of, validate, world_model

    options = _set_options(args.set)
    if args.target.endswith(".py"):
        args.plugin.append(args.target)  # so worker processes and SLURM jobs load it too
    args.config = args.protocol or args.config
    args.defenses = args.attacks = None
    cfg = _prepare_run(args)
    # validated on the protocol's world CLIP when the protocol runs on the world, else the default one
    checks = validate(args.target, world_model(cfg.model, cfg.pretrained, cfg.models), options)
    for check in checks:
        print(check.line())
    failed = sum(check.status == "fail" for check in checks)
    if failed:
        raise UserError(f"{args.target} failed {failed} of {len(checks)} validate checks; no submission was run",
                        "fix what the FAIL lines name, then submit again")
    found = plugins_of(args.target)
    if len(found) != 1:
        raise UserError(f"{args.target} registers {len(found)} plugins ({', '.join(n for _, n in found)})",
                        "submit one defense or attack at a time: one per file")
    (kind, name), = found
    if args.like is not None and kind != "defenses":
        raise UserError("--like takes a defense's training recipe; an attack has none", "drop --like")
    if args.out is None:
        cfg.out = str(Path("submissions") / name)
    spec = add_plugin(cfg, kind, name, options, args.like, only_new=bool(args.baseline))
    plan = _execute(cfg, args)
    if plan is None:
        print(f"submitted; when the jobs finish: vlbench leaderboard {' '.join(map(str, args.baseline))} {cfg.out} "
              f"--out {cfg.out}")
        return 0
    _summary(cfg, plan)
    record_command(cfg.out, args.argv)
    protocol = str(args.config) if args.config else "configs/world.yaml (built in)"
    write_submission(cfg.out, submission_record(kind, spec, protocol, "vlbench " + shlex.join(args.argv), checks))
    write_leaderboard([*args.baseline, Path(cfg.out)], print_markdown=True, out=cfg.out)
    print(f"submission: {cfg.out} (cells, submission.json, leaderboard.html)", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from vlbench.reporting.compare import compare, format_comparison

    names = [name.strip() for name in args.defenses.split(",") if name.strip()]
    if len(names) != 2:
        raise UserError(f"--defenses {args.defenses!r} does not name two defenses", "write --defenses A,B")
    print(format_comparison(compare(args.results_dir, *names), *names))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from vlbench.run.status import format_status

    print(format_status(args.results_dir))
    return 0


def _set_options(items: list[str]) -> dict:
    """``--set KEY=VALUE`` options, each value read as YAML."""
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r} is not KEY=VALUE", "write e.g. --set mlm=world")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UserError(f"--set {item!r}: the value is not YAML ({' '.join(str(exc).split())[:80]})",
                            "quote it, e.g. --set 'text_params={mlm: world}'") from None
    return options


def cmd_prepare(args: argparse.Namespace) -> int:
    from vlbench import api, plugins

    plugins.load_files(args.plugin)
    plugin = api.build(args.kind + "s", args.name, _set_options(args.set))
    for what, _ in plugin.pending():
        print(f"building: {what}", file=sys.stderr, flush=True)
    plugin.prepare()
    print(f"{args.kind} {args.name}: ready")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from vlbench.run.validate import validate, world_model

    checks = validate(args.target, world_model(pretrained=args.pretrained), _set_options(args.set))
    for check in checks:
        print(check.line())
    failed = sum(check.status == "fail" for check in checks)
    print(f"{failed} of {len(checks)} checks failed" if failed else f"all {len(checks)} checks passed or n/a")
    return 2 if failed else 0


def cmd_models(args: argparse.Namespace) -> int:
    from vlbench.models.card import card, get_model

    if args.models_command == "check":
        from tabulate import tabulate

        from vlbench.models.weights import human_size, status

        names = args.names or list(card())
        found = [status(get_model(name)) for name in names]
        print(tabulate([(s.name, "present" if s.present else "missing", human_size(s.size),
                         {True: "verified", False: "MISMATCH", None: "–"}[s.verified], s.note, s.where)
                        for s in found], headers=["name", "state", "size", "sha256", "note", "where"]))
        print(f"{sum(s.present for s in found)} of {len(found)} present, {sum(s.verified is True for s in found)} "
              f"verified, {sum(s.verified is False for s in found)} differing from their entry")
        return 1 if any(s.verified is False for s in found) else 0
    from vlbench.models.fetch import fetch

    every = args.names == ["all"]
    specs = [get_model(name) for name in (list(card()) if every else args.names)]  # all checked before downloading
    report = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    failed = []
    for spec in specs:
        try:
            print(fetch(spec, args.precision, progress=not args.no_progress, report=report).line())
        except UserError as exc:
            if not every:
                raise
            failed.append(spec.name)  # `all` fetches what it can and names the rest
            print(f"{spec.name}: not fetched: {exc}", file=sys.stderr, flush=True)
    if failed:
        raise UserError(f"{len(failed)} of {len(specs)} entries were not fetched ({', '.join(failed)})",
                        "see the lines above; an entry with a path is placed by hand (its entry says where from)")
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    import json

    from vlbench.models.precision import check_precision
    from vlbench.store.paths import package_file
    from vlbench.world.pretrain import RELEASED, PretrainConfig, release, world_checkpoint

    if args.release:
        if args.precision != "fp32":
            raise UserError("the release is pretrained in fp32", "drop --precision")
        record = release(package_file(RELEASED), "vlbench " + " ".join(args.argv), force=args.force)
        print(f"released {package_file(RELEASED)}: sha256 {record['sha256']} (models.yaml, world-clip)")
        print(json.dumps(record["metrics"], indent=2))
        return 0
    path = world_checkpoint(PretrainConfig(precision=check_precision(args.precision)), force=args.force)
    print(path)
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        print(json.dumps(json.loads(sidecar.read_text()).get("metrics", {}), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the run record's command
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default")
    handlers = {"run": cmd_run_matrix, "ls": cmd_ls, "leaderboard": cmd_leaderboard, "world": cmd_world,
                "prepare": cmd_prepare, "status": cmd_status, "compare": cmd_compare, "audit": cmd_audit,
                "validate": cmd_validate, "submit": cmd_submit, "models": cmd_models}
    try:
        return handlers[args.command](args)
    except UserError as exc:
        print(f"vlbench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vlbench: interrupted; finished cells are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
