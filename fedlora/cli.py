"""`fedlora ...` commands. Validate everything before heavy imports or work; user errors are one
message and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from typing import Any

from fedlora.deploy.cli import DEPLOY_COMMANDS, add_deploy_commands
from fedlora.errors import FedloraError
from fedlora.interrupt import Interrupted, resume_command
from fedlora.quiet import quiet_libraries

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
    "personalize_steps": ("federation", "personalize_steps", int),
    "privacy": ("privacy", "level", str),
}


#: one example per command, shown at the end of its --help
EXAMPLES: dict[str, str] = {
    "simulate": "fedlora simulate --model tiny-random --clients 3 --rounds 2 --out runs/try\n"
    "  fedlora simulate --config configs/scaffold.toml --out runs/scaffold --resume",
    "export": "fedlora export runs/try --out exported/try --merge",
    "eval": "fedlora eval runs/try --rows 200 --json eval.json",
    "compare": "fedlora compare base runs/try",
    "audit": "fedlora audit runs/try --json runs/try/audit.json",
    "generate": "fedlora generate 'Review: works well. Condition:' --adapter run=runs/try",
    "sweep": "fedlora sweep --grid strategy=fedavg,scaffold --repeats 2 --rounds 5 --out sweeps/s",
    "certs": "fedlora certs pki --server-name fl.example.org --site st-marys --site city",
    "server": "fedlora server --config server/server.toml\n"
    "  fedlora server --config server/server.toml --revoke st-marys",
    "client": "fedlora client --config clients/site.toml",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default where it has one (not for flags whose default comes from the
    config) and keeps the examples' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_ = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in help_:
            return action.help
        return super()._get_help_string(action)


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
        "--model",
        help="SmolLM2-135M-Instruct (default), tiny-random, random:<shape> (random weights of a "
        "published size: random:llama-1b, random:llama-8b, random:qwen2-1.5b, "
        "random:mistral-7b, random:gemma-2b), a folder or hub id",
    )
    sim.add_argument(
        "--data",
        help=".jsonl/.csv training file, or wordnet (default: built-in Drugs.com reviews)",
    )
    sim.add_argument("--partition", help="natural, iid or dirichlet (data.partition)")
    sim.add_argument("--seed", type=int, help="random seed (run.seed)")
    sim.add_argument("--out", help="results folder (default runs/<time>-<strategy>)")
    sim.add_argument(
        "--personalize-steps",
        type=int,
        help="after the last round, each site fine-tunes the global adapter this many steps and "
        "reports global vs personalised accuracy (federation.personalize_steps)",
    )
    sim.add_argument(
        "--privacy",
        help="differential privacy: none, sample (DP-SGD at each site) or client (clipped, "
        "noised site updates); tune with --set privacy.noise_multiplier=... (privacy.level)",
    )
    sim.add_argument(
        "--secure-agg",
        action="store_const",
        const=True,
        help="secure aggregation: the server learns only the sum of the sites' updates "
        "(secure.enabled)",
    )
    sim.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run (same command and --out) from its last finished round",
    )
    sim.add_argument(
        "--restart",
        action="store_true",
        help="replace the saved rounds of an interrupted run in <out>.partial and start afresh",
    )
    sim.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. --set train.lr=5e-4 --set lora.targets=o_proj (repeatable)",
    )
    add_lifecycle_commands(sub)
    add_sweep_command(sub)
    add_audit_command(sub)
    add_deploy_commands(sub)
    for name, command in sub.choices.items():
        command.formatter_class = _HelpFormatter
        command.epilog = f"example:\n  {EXAMPLES[name]}"
    _show_config_defaults(sim, sub.choices["sweep"])
    return parser


def _show_config_defaults(*parsers: argparse.ArgumentParser) -> None:
    """A shortcut flag's default is its config key's default: say it in the help."""
    from fedlora.config import Config

    defaults = Config()
    for parser in parsers:
        for action in parser._actions:  # noqa: SLF001 (argparse has no public list)
            if action.dest in SIMULATE_FLAGS and action.help and "default" not in action.help:
                section, key, _ = SIMULATE_FLAGS[action.dest]
                value = getattr(getattr(defaults, section), key)
                if value not in (None, ""):
                    action.help += f" (default: {value})"


def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is a one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_base_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base",
        help="base model (default: the one the run used; SmolLM2-135M-Instruct, tiny-random, a "
        "folder or hub id)",
    )
    p.add_argument(
        "--allow-other-base",
        action="store_true",
        help="use an adapter on a base model with another name (shapes must still fit)",
    )


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    _add_base_flags(p)
    p.add_argument(
        "--data", help=".jsonl/.csv file; its held-out split is used (default: the run's)"
    )
    p.add_argument("--task", choices=["classify", "text"], help="default: the run's data.task")
    p.add_argument(
        "--rows", type=_positive, help="evaluate at most N held-out rows (a seeded subset)"
    )
    p.add_argument(
        "--bootstrap", type=_positive, default=1000, help="bootstrap draws (default 1000)"
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--json", help="also write the numbers to this JSON file")


def add_lifecycle_commands(sub) -> None:
    what = "a results folder, an adapter folder, or `base` (the bare base model)"
    exp = sub.add_parser(
        "export",
        help="copy a run's adapter, or merge it into a standalone model",
        description="Export the global adapter of a `fedlora simulate` results folder: as a peft "
        "adapter (adapter_config.json + adapter_model.safetensors, with the run's config.toml and "
        "summary.json), or with --merge as a standalone transformers model with the adapter "
        "folded into its weights.",
    )
    exp.add_argument("run_dir", metavar="RUN_DIR", help="results folder (or adapter folder)")
    exp.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    exp.add_argument(
        "--merge", action="store_true", help="save base + adapter merged (W + alpha/r * B A)"
    )
    _add_base_flags(exp)

    ev = sub.add_parser(
        "eval",
        help="held-out metrics of an adapter, with 95%% confidence intervals",
        description="Evaluate an adapter on held-out rows: eval loss, accuracy and macro-F1 "
        "(classify) or perplexity (text), with 95% confidence intervals.",
    )
    ev.add_argument("adapter", metavar="ADAPTER", help=what)
    _add_eval_flags(ev)
    ev.add_argument(
        "--per-site",
        action="store_true",
        help="each site's own held-out rows with the global adapter and with the site's "
        "personalised one (from `simulate --personalize-steps`), switching on one base model",
    )
    ev.add_argument(
        "--site-adapter",
        action="append",
        default=[],
        metavar="SITE=DIR",
        help="with --per-site: site SITE's personalised adapter (repeatable; default: every "
        "sites/site-<k>/adapter of the results folder)",
    )

    cmp_ = sub.add_parser(
        "compare",
        help="compare two adapters on the same held-out rows (McNemar, paired bootstrap)",
        description="Evaluate A and B on the same held-out rows; show both with confidence "
        "intervals, a paired test of B against A, and a verdict.",
    )
    cmp_.add_argument("a", metavar="A", help=what)
    cmp_.add_argument("b", metavar="B", help=what)
    _add_eval_flags(cmp_)

    gen = sub.add_parser(
        "generate",
        help="greedy completions of a prompt by several adapters on one base model",
        description="Load several adapters on one base model (loaded once) and print each "
        "adapter's greedy completion of PROMPT.",
    )
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument(
        "--adapter",
        action="append",
        default=[],
        required=True,
        metavar="NAME=DIR",
        help="an adapter or results folder under a name (repeatable)",
    )
    gen.add_argument("--max-new-tokens", type=_positive, default=32, help="default 32")
    gen.add_argument(
        "--show-base", action="store_true", help="also print the bare base model's completion"
    )
    _add_base_flags(gen)


def add_sweep_command(sub) -> None:
    sw = sub.add_parser(
        "sweep",
        help="one federation per point of a grid over config keys, with tables and plots",
        description="Run one federation per combination of --grid values (x --repeats seeds), "
        "one after the other, into --out; rerunning the same sweep skips finished runs. Writes "
        "results.csv, results.md (mean ± std over repeats), utility_vs_epsilon.png and "
        "utility_vs_rounds.png.",
    )
    sw.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2,...",
        help="a config key and its values, e.g. --grid lora.r=4,8 --grid strategy=fedavg,scaffold "
        "(values are TOML; shortcuts as the flags below; repeatable)",
    )
    sw.add_argument("--repeats", type=_positive, default=1, help="seeds per point (default 1)")
    sw.add_argument("--out", required=True, help="the sweep folder (the same one to resume)")
    sw.add_argument("--config", help="TOML config file every point starts from")
    sw.add_argument(
        "--baseline",
        help="a finished results folder without privacy, drawn as the reference line in "
        "utility_vs_epsilon.png and quoted in results.md",
    )
    sw.add_argument(
        "--audit",
        action="store_true",
        help="run `fedlora audit` on every finished run (an eval pass each): the attack's AUC "
        "becomes the attack_auc column and utility_vs_leakage.png is drawn",
    )
    for flag, (section, key, kind) in SIMULATE_FLAGS.items():
        if flag != "out":
            name = "--" + flag.replace("_", "-")
            what = "fixed for every point"
            if flag == "seed":
                what = "the first seed; repeat k uses seed + k"
            sw.add_argument(name, type=kind, help=f"{what} ({section}.{key})")
    sw.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, fixed for every point (repeatable)",
    )


def add_audit_command(sub) -> None:
    au = sub.add_parser(
        "audit",
        help="measured leakage: a membership-inference attack on a run's global adapter",
        description="Attack a run's global adapter with a loss threshold and a likelihood "
        "ratio against the base model: each site's training rows (members) against as many of "
        "its held-out rows (non-members). Reports AUC and the true-positive rate at 1% and 0.1% "
        "false-positive rate with bootstrap 95% intervals, per site and overall.",
    )
    au.add_argument("run_dir", metavar="RUN_DIR", help="results folder (or adapter + config.toml)")
    au.add_argument(
        "--rows",
        type=_positive,
        default=500,
        help="at most N member and N non-member rows per site, a seeded subset (default 500)",
    )
    au.add_argument(
        "--site-update",
        type=int,
        metavar="SITE",
        help="also attack site SITE's plaintext update as the server would see it without "
        "secure aggregation (recomputed from the final global adapter; see the README)",
    )
    au.add_argument(
        "--bootstrap", type=_positive, default=1000, help="bootstrap draws (default 1000)"
    )
    au.add_argument("--seed", type=int, default=0, help="subsampling and bootstrap seed")
    au.add_argument("--json", help="also write the numbers to this JSON file")


def cmd_audit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedlora.audit import check_site_update, format_audit, load_run, run_audit, write_json

    _check_json_target(args.json)
    check_site_update(load_run(args.run_dir).cfg, args.site_update)  # before loading a model
    report = run_audit(args.run_dir, args.rows, args.bootstrap, args.seed, args.site_update)
    print()
    print(format_audit(report))
    if args.json:
        write_json(report, Path(args.json).expanduser())
    return 0


def config_from_args(args: argparse.Namespace):
    from fedlora.config import load_config, parse_override

    overrides: list[dict[str, Any]] = []
    for flag, (section, key, _) in SIMULATE_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append({section: {key: value}})
    if getattr(args, "secure_agg", None):
        overrides.append({"secure": {"enabled": True}})
    overrides += [parse_override(text) for text in args.set]
    return load_config(args.config, overrides)


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.resume and args.restart:
        raise FedloraError(
            "--resume continues the saved rounds and --restart removes them: give one."
        )
    cfg = config_from_args(args)
    from fedlora.simulate import simulate

    out = simulate(cfg, resume=args.resume, restart=args.restart)
    sites = ", sites/site-<k>/adapter/" if cfg.federation.personalize_steps else ""
    print(
        f"\nResults: {out}/ (config.toml, metrics.jsonl, summary.json, metrics.png, "
        f"adapter/{sites})"
    )
    return 0


def _print_notes(source) -> None:
    for note in source.notes:
        print(f"note: {note}")


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedlora.lifecycle import check_out_dir, export, resolve_source

    source = resolve_source(args.run_dir)
    out = Path(args.out).expanduser()
    check_out_dir(out)  # before loading anything
    _print_notes(source)
    export(source, out, args.merge, args.base, args.allow_other_base)
    return 0


def _check_json_target(path: str | None) -> None:
    from pathlib import Path

    if path and Path(path).expanduser().is_dir():
        raise FedloraError(f"--json {path} is a folder; give a file name.")


def _scoring_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options `eval` and `compare` share, as keyword arguments."""
    return {
        "base": args.base,
        "data": args.data,
        "task": args.task,
        "rows": args.rows,
        "draws": args.bootstrap,
        "seed": args.seed,
        "allow_other_base": args.allow_other_base,
    }


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedlora.lifecycle import parse_site_specs, resolve_source

    if args.site_adapter and not args.per_site:
        raise FedloraError("--site-adapter goes with --per-site.")
    if args.per_site and args.rows:
        raise FedloraError("--rows does not apply to --per-site: each site's held-out rows count.")
    source = resolve_source(args.adapter)
    sites = [(k, resolve_source(d)) for k, d in parse_site_specs(args.site_adapter)]
    _check_json_target(args.json)
    from fedlora.evaluation import (
        format_eval,
        format_per_site,
        run_eval,
        run_eval_per_site,
        write_json,
    )

    if args.per_site:
        options = _scoring_options(args)
        del options["rows"]
        report = run_eval_per_site(source, sites or None, **options)
        text = format_per_site(report)
    else:
        report = run_eval(source, **_scoring_options(args))
        text = format_eval(report)
    print()
    print(text)
    if args.json:
        write_json(report, Path(args.json).expanduser())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedlora.lifecycle import resolve_source

    a, b = resolve_source(args.a), resolve_source(args.b)
    _check_json_target(args.json)
    from fedlora.evaluation import format_compare, run_compare, write_json

    report = run_compare(a, b, **_scoring_options(args))
    print()
    print(format_compare(report))
    if args.json:
        write_json(report, Path(args.json).expanduser())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fedlora.lifecycle import generate, parse_adapter_specs, resolve_source

    adapters = [
        (name, resolve_source(folder)) for name, folder in parse_adapter_specs(args.adapter)
    ]
    for _, source in adapters:
        _print_notes(source)
    results = generate(
        adapters,
        args.prompt,
        base=args.base,
        max_new_tokens=args.max_new_tokens,
        show_base=args.show_base,
        allow_other_base=args.allow_other_base,
    )
    width = max(len(n) for n in results)
    print()
    for name, text in results.items():
        print(f"[{name:<{width}}] {args.prompt}{text}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedlora.config import parse_override
    from fedlora.sweep import parse_grid, plan_sweep, run_sweep

    fixed = [
        {section: {key: getattr(args, flag)}}
        for flag, (section, key, _) in SIMULATE_FLAGS.items()
        if flag != "out" and getattr(args, flag) is not None
    ]
    fixed += [parse_override(text) for text in args.set]
    axes = parse_grid(args.grid, SIMULATE_FLAGS)
    plan = plan_sweep(Path(args.out).expanduser(), axes, args.repeats, args.config, fixed)
    plan.audit = args.audit
    if args.baseline:
        plan.baseline = Path(args.baseline).expanduser()
        if not (plan.baseline / "summary.json").is_file():
            raise FedloraError(
                f"--baseline {args.baseline} is not a finished results folder (no summary.json)."
            )
    return run_sweep(plan)


COMMANDS = {
    "simulate": cmd_simulate,
    "export": cmd_export,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "generate": cmd_generate,
    "sweep": cmd_sweep,
    "audit": cmd_audit,
    **DEPLOY_COMMANDS,
}


def resume_hint(command: str, argv: list[str], exc: Interrupted) -> str:
    """The one line an interrupted command ends with: what is kept and how to go on."""
    if command == "sweep":
        again = shlex.join(["fedlora", *argv])
        return (
            f"interrupted ({signal.Signals(exc.signum).name}); finished runs are kept; continue "
            f"with the same command (the interrupted run starts again): {again}"
        )
    if command == "simulate" and exc.out is not None:
        return exc.describe(resume_command(argv, exc.out))
    if command == "server":
        return exc.describe(
            shlex.join(["fedlora", *[a for a in argv if a != "--resume"], "--resume"])
        )
    return exc.describe(None)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = None
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return COMMANDS[args.command](args)
    except FedloraError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        print(f"fedlora: {resume_hint(args.command, argv, exc)}", file=sys.stderr)
        # the round loop may be in a thread busy evaluating; the saved state is on disk and
        # nothing else is owed, so end now instead of waiting for it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.exit_code)
    except KeyboardInterrupt:
        print("fedlora: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
