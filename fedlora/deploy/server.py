"""`fedlora server`: run one federation on Flower's deployment engine.

The SuperLink is served from this process (fedlora.deploy.link explains how and why), the
keys of the sites in `[sites]` are registered (a registered site left out stays registered and
takes no part; `revoke` revokes keys on purpose), the federation is started as a Flower run
whose bundle carries the federation's config to the sites, and the same `Federation` round
loop as `fedlora simulate` drives it, writing the same results folder. The server state is saved
after every round in `<out>.partial/state`; `--resume` continues from it after a crash (even
SIGKILL), and without `--resume` an interrupted federation's state is never overwritten.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedlora import checkpoint
from fedlora.apps import records
from fedlora.apps.discovery import DelegatingGrid
from fedlora.config import Config
from fedlora.deploy import runconfig
from fedlora.deploy.settings import ServerSettings
from fedlora.errors import FedloraError
from fedlora.interrupt import STOP_GRACE, Interrupted, StopSwitch, on_signals, signal_of
from fedlora.privacy.secrets import SITE_CSPRNG
from fedlora.quiet import quiet_libraries
from fedlora.report import Reporter, human_bytes
from fedlora.results import (
    check_no_saved_state,
    check_out,
    close_results,
    finish,
    open_results,
    precision_name,
    results_dir,
    resume_dir,
    run_state_dir,
    settle_precision,
)
from fedlora.trackers import open_trackers

if TYPE_CHECKING:
    from fedlora.deploy.link import Link

#: inside the run's state folder: the id the sites keep this federation's state under
FEDERATION_ID = "federation.id"


def shared_config(cfg: Config) -> str:
    """The federation's config as the sites receive it: without the server's own paths (its
    evaluation data and results folder are none of the sites' business) and trackers."""
    values = cfg.to_dict()
    values["data"] = {k: v for k, v in values["data"].items() if k not in ("path", "test_path")}
    # the site runs on its own hardware: its device is its site.toml's, never the server's
    values["model"] = {k: v for k, v in values["model"].items() if k != "device"}
    simulation_only = ("gpus_per_client", "ray_address")  # Ray's settings, not a site's
    values["federation"] = {
        k: v for k, v in values["federation"].items() if k not in simulation_only
    }
    values["run"] = {k: v for k, v in values["run"].items() if k not in ("out", "trackers")}
    return "".join(f"[{section}]\n{_toml_lines(entries)}\n" for section, entries in values.items())


def _toml_lines(entries: dict) -> str:
    return "".join(
        f"{key} = {json.dumps(value, ensure_ascii=False)}\n" for key, value in entries.items()
    )


def federation_id(state_dir: Path) -> str:
    """A new federation gets a fresh id; a resumed one keeps it."""
    path = state_dir / FEDERATION_ID
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex)
    return path.read_text().strip()


class VerifiedGrid(DelegatingGrid):
    """The run's Grid, with two checks on the registered key a node connected with: only the
    nodes of listed sites are seen (a registered site left out of `[sites]` may connect, but
    takes no part), and a site that names itself in a query reply must be the site whose key
    the SuperLink authenticated (no site can take another's place)."""

    def __init__(
        self,
        grid: Grid,
        names: dict[int, str],
        sites: list[str],
        note: Callable[[str], None],
    ) -> None:
        super().__init__(grid)
        self.names, self.sites, self.note = names, sites, note
        self.warned: set[int] = set()
        self.unlisted: set[int] = set()

    def get_node_ids(self) -> list[int]:
        """The connected nodes of listed sites. Discovery asks every node it is given which site
        it is; an unlisted site cannot answer (it is not in the run's list) and would be asked
        again and again."""
        listed = []
        for node in self.grid.get_node_ids():
            name = self.names.get(node)
            if name in self.sites:
                listed.append(node)
            elif node not in self.unlisted:
                self.unlisted.add(node)
                self.note(
                    f"node {node} (key of {name or 'an unknown site'}) is connected but not in "
                    "[sites]; ignored."
                )
        return listed

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [r for r in super().pull_messages(message_ids) if self.ok(r)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return [r for r in super().send_and_receive(messages, timeout=timeout) if self.ok(r)]

    def ok(self, reply: Message) -> bool:
        if reply.has_error() or reply.metadata.message_type != MessageType.QUERY:
            return True
        node = reply.metadata.src_node_id
        try:
            index = int(reply.content[records.SITE_METRICS][records.SITE_ID])
            claimed = self.sites[index] if 0 <= index < len(self.sites) else f"number {index}"
        except (KeyError, TypeError, ValueError):
            claimed = "nobody"
        if self.names.get(node) == claimed:
            return True
        if node not in self.warned:
            self.warned.add(node)
            self.note(
                f"node {node} (key of {self.names.get(node, 'an unknown site')}) claims to be "
                f"site {claimed}; ignored: check [site] name in that site's site.toml."
            )
        return False


def serve(
    settings: ServerSettings,
    cfg: Config,
    *,
    insecure: bool,
    resume: bool,
    log: Callable[[str], None] = print,
) -> Path:
    """Run the federation; return its finished results folder."""
    quiet_libraries()
    out = results_dir(cfg)
    if resume:
        resume_dir(cfg)
    else:
        check_out(out)
        check_no_saved_state(out)
    cfg.run.out = str(out)
    shared = shared_config(cfg)  # before the server settles its own precision: sites settle theirs
    from fedlora.deploy.link import Link, stop_unfinished_runs, sync_sites

    link = Link(settings, insecure)
    try:
        link.start()
        # the site keys before the model loads: a key the registry refuses is reported in
        # seconds, with no results folder begun
        if insecure:
            log(
                "WARNING: --insecure: no TLS and no node authentication. Site updates cross "
                "the network in the clear and any machine that reaches this port can join "
                "as a site. Use it for rehearsals on a closed network only."
            )
        else:
            for change in sync_sites(link, settings.sites):
                log(f"Site keys: {change}.")
        # at once: sites connect from now on, and a stale run's messages must not reach them
        if stale := stop_unfinished_runs(link):
            log(f"Stopped {stale} run(s) left by a previous server process.")
        return _federate(
            settings, cfg, link, shared, out, insecure=insecure, resume=resume, log=log
        )
    finally:
        link.stop()


def _federate(
    settings: ServerSettings,
    cfg: Config,
    link: Link,
    shared: str,
    out: Path,
    *,
    insecure: bool,
    resume: bool,
    log: Callable[[str], None],
) -> Path:
    """Load the server's model, run the federation on the started SuperLink, finish its
    results folder."""
    from fedlora.apps.collect import dropout_warning
    from fedlora.apps.server import Federation
    from fedlora.deploy.link import node_names, serverapp_task, start_run
    from fedlora.runtime import build_runtime, load_data

    state = run_state_dir(out)
    dataset, _, _ = load_data(cfg, log)  # fail fast on the evaluation data
    log(f"Evaluation data: {dataset.name}, {len(dataset.test)} held-out rows.")
    started = time.perf_counter()
    log(f"Loading base model {cfg.model.name} ...")
    runtime = build_runtime(cfg, log, threads=os.cpu_count() or 1)
    # the server's own precision is part of its saved state: a resume keeps it or is refused
    runtime.bf16 = settle_precision(cfg, runtime.bf16, out if resume else None)
    n_lora = sum(p.numel() for p in runtime.model.parameters() if p.requires_grad)
    log(
        f"Strategy {cfg.strategy.name}, {cfg.federation.rounds} rounds, LoRA r={cfg.lora.r} on "
        f"{', '.join(cfg.lora.target_modules())} ({human_bytes(4 * n_lora)} per adapter), "
        f"{precision_name(runtime.bf16)} on the server."
    )
    work = open_results(cfg, out, resume)
    names = sorted(settings.sites)
    run_config = {
        runconfig.CONFIG: shared,
        runconfig.SITES: json.dumps(names),
        runconfig.FEDERATION: federation_id(state),
    }
    switch = StopSwitch()
    reporter = None
    try:
        with on_signals(switch, grace=STOP_GRACE):
            run_id = start_run(link, run_config)
            mode = "plaintext" if insecure else "TLS, node authentication"
            log(
                f"Listening on {settings.host}:{settings.port} ({mode}); waiting for "
                f"{len(names)} sites: {', '.join(names)}."
            )
            if warning := dropout_warning(cfg, len(names)):
                log(warning)
            reporter = Reporter(
                work,
                total_rounds=cfg.federation.rounds,
                trackers=open_trackers(cfg.run.trackers, work, cfg.to_dict()),
            )
            with serverapp_task(link, run_id, log) as grid:
                federation = Federation(
                    cfg,
                    runtime,
                    reporter,
                    state,
                    noise_seed=secrets.randbits(63),
                    switch=switch,
                    site_names=names,
                )
                verified = (
                    grid if insecure else VerifiedGrid(grid, node_names(link), names, reporter.note)
                )
                federation.run(verified)
        finish(cfg, runtime, federation, work, time.perf_counter() - started, SITE_CSPRNG)
    except BaseException as exc:
        if signum := signal_of(exc, switch):
            switch.throw(signum)
            raise Interrupted(signum, work, checkpoint.saved_round(state)) from None
        log(
            f"The federation did not finish; partial output kept in {work} (continue it with "
            "the same command and --resume)."
        )
        raise
    finally:
        if reporter is not None:
            reporter.close()
    return close_results(out, work)


def revoke(
    settings: ServerSettings,
    names: list[str],
    log: Callable[[str], None] = print,
) -> None:
    """Revoke the registered keys of `names` for good, and serve nothing: revocation is an act
    of its own, between federations (stop a running one first; `--resume` continues it)."""
    quiet_libraries()
    from fedlora.deploy.link import Link, revoke_sites

    link = Link(settings, insecure=False)
    try:
        try:
            link.start()
        except FedloraError as exc:  # most likely the server itself holds the port
            raise FedloraError(f"{exc} Stop the server before --revoke.") from None
        for change in revoke_sites(link, names, settings.sites):
            log(f"Site keys: {change}.")
    finally:
        link.stop()
