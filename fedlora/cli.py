"""`fedlora ...` commands. Validate everything before heavy imports or work; user errors are one
message and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fedlora.errors import FedloraError

#: flags that are shortcuts for config keys
SIMULATE_FLAGS: dict[str, tuple[str, str, type]] = {
    "clients": ("federation", "clients", int),
    "rounds": ("federation", "rounds", int),
    "strategy": ("strategy", "name", str),
    "local_steps": ("train", "local_steps", int),
    "model": ("model", "name", str),
    "data": ("data", "path", str),
    "partition": ("data", "partition", str),
    "seed": ("run", "seed", int),
    "out": ("run", "out", str),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other user error
        self.print_usage(sys.stderr)
        raise FedloraError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedlora", description="Federated LoRA fine-tuning.")
    from fedlora import __version__

    parser.add_argument("--version", action="version", version=f"fedlora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sim = sub.add_parser(
        "simulate",
        help="run a whole federation of simulated sites on this machine",
        description="Run a federation of simulated sites on Flower's simulation engine.",
    )
    sim.add_argument("--config", help="TOML config file (see configs/)")
    sim.add_argument("--clients", type=int, help="number of sites (federation.clients)")
    sim.add_argument("--rounds", type=int, help="federated rounds (federation.rounds)")
    sim.add_argument("--strategy", help="fedavg, fedprox, scaffold or fednova (strategy.name)")
    sim.add_argument("--local-steps", type=int, help="local optimiser steps per round")
    sim.add_argument(
        "--model", help="SmolLM2-135M-Instruct (default), tiny-random, a folder or hub id"
    )
    sim.add_argument(
        "--data", help=".jsonl/.csv training file (default: built-in Drugs.com reviews)"
    )
    sim.add_argument("--partition", help="natural, iid or dirichlet (data.partition)")
    sim.add_argument("--seed", type=int, help="random seed (run.seed)")
    sim.add_argument("--out", help="results folder (default runs/<time>-<strategy>)")
    sim.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. --set train.lr=5e-4 --set lora.targets=o_proj (repeatable)",
    )
    return parser


def config_from_args(args: argparse.Namespace):
    from fedlora.config import load_config, parse_override

    overrides: list[dict[str, Any]] = []
    for flag, (section, key, _) in SIMULATE_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append({section: {key: value}})
    overrides += [parse_override(text) for text in args.set]
    return load_config(args.config, overrides)


def cmd_simulate(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from fedlora.simulate import simulate

    out = simulate(cfg)
    print(f"\nResults: {out}/ (config.toml, metrics.jsonl, summary.json, metrics.png, adapter/)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return {"simulate": cmd_simulate}[args.command](args)
    except FedloraError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fedlora: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
