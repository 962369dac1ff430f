"""Precompute and cache an N:N augmentation bank, so training (or a cluster job) finds it built:

    python -m defenses.nn [--dataset world-retrieval] [--pools all] [--per-pool 2] [--margin 0.05]

Bad input prints one line and exits with status 2, as ``vlbench`` does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vlbench.errors import UserError

from .bank import IMAGE_POOLS, TEXT_POOLS, AugmentConfig, cached_bank


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m defenses.nn", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="world-retrieval", help="a retrieval dataset")
    parser.add_argument("--split", default="train")
    parser.add_argument("--pools", default="all", help="'all' or pool names, comma-separated")
    parser.add_argument("--per-pool", type=int, default=2)
    parser.add_argument("--margin", type=float, default=0.05, help="alignment filter margin")
    parser.add_argument("--model", default="world-clip", help="base model: a model card entry, or an open_clip "
                        "architecture with --pretrained (default: the world CLIP)")
    parser.add_argument("--pretrained", default=None, help="other weights for --model: a tag, hf-hub:ORG/NAME or a path")
    parser.add_argument("--data-root", type=Path)
    return parser


def augment(args: argparse.Namespace) -> None:
    from tabulate import tabulate

    from vlbench.data.datasets import load_dataset
    from vlbench.models.factory import load_victim

    if args.data_root:
        os.environ["VLBENCH_DATA"] = str(args.data_root)
    asked = [p for p in args.pools.replace(" ", ",").split(",") if p]
    pools = TEXT_POOLS + IMAGE_POOLS if "all" in asked else tuple(asked)
    unknown = set(pools) - set(TEXT_POOLS + IMAGE_POOLS)
    if unknown:
        raise UserError(f"unknown augmentation pools {sorted(unknown)}", f"use all or {TEXT_POOLS + IMAGE_POOLS}")
    data = load_dataset(args.dataset, split=args.split)
    if data.task != "retrieval":
        raise UserError(f"{args.dataset} is a {data.task} dataset", "augment a retrieval dataset")
    victim = load_victim(args.model, args.pretrained)
    config = AugmentConfig(tuple(p for p in TEXT_POOLS if p in pools), tuple(p for p in IMAGE_POOLS if p in pools),
                           args.per_pool, args.margin)
    bank, folder = cached_bank(victim, data, config)
    print(folder)
    rows = [(pool, s["generated"], f"{100 * s['kept_fraction']:.1f}%", f"{s['alignment']:.3f}", f"{s['diversity']:.3f}")
            for pool, s in bank.stats.items()]
    print(tabulate(rows, headers=["pool", "generated", "kept", "alignment", "diversity"]))


def main(argv: list[str] | None = None) -> int:
    try:
        augment(build_parser().parse_args(argv))
    except UserError as exc:
        print(f"python -m defenses.nn: error: {exc}", file=sys.stderr)
        return UserError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
