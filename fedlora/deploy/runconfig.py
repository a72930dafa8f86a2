"""What a deployed federation tells its sites, and what a site tells the federation.

The server puts the federation's settings into the Flower run config (every site of the run
receives it with the app bundle): the effective fedlora config as TOML, the site names in
index order and a federation id that stays the same when the server resumes. A site daemon puts
its own name and its own config file into its SuperNode's node config. Nothing else crosses.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping

from fedlora.errors import FedloraError

# run config (server -> every site)
CONFIG = "fedlora-config"  # the federation's fedlora config, TOML text (no server paths)
SITES = "fedlora-sites"  # JSON list of the registered site names; a site's index = position
FEDERATION = "fedlora-federation"  # id of this federation: a resumed run keeps it

# node config (a site daemon -> its own ClientApp)
SITE_NAME = "site-name"
SITE_CONFIG = "site-config"  # path of the site's site.toml


#: what a federation id may be: the server makes a uuid4 hex; a site keeps the federation's
#: state in a folder of that name, so never a path
FEDERATION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def federation(run_config: Mapping[str, object]) -> str:
    """The federation's id, as a site daemon may use it: a name, never a path (a server that
    sent "../../srv" or "/srv/data" would have the site keep its state wherever it chose)."""
    value = str(run_config.get(FEDERATION, ""))
    if not FEDERATION_ID.match(value):
        raise FedloraError(
            f"The server named this federation {value[:80]!r}, which is not a federation id "
            "(1-64 letters, digits, '-' or '_'); this site will not use it as a folder name."
        )
    return value


def digest(run_config: Mapping[str, object]) -> bytes:
    """The run config as this site received it (config, sites, federation id): a Flower server
    hands each site its own, so only the sites' signatures on this digest (in their
    secure-aggregation keys: fedlora.apps.records.session_terms) show that all got the same."""
    terms = {key: str(run_config.get(key, "")) for key in (CONFIG, SITES, FEDERATION)}
    return hashlib.sha256(json.dumps(terms, sort_keys=True).encode()).digest()


def is_site_daemon(node_config: Mapping[str, object]) -> bool:
    return SITE_NAME in node_config


def site_index(node_config: Mapping[str, object], run_config: Mapping[str, object]) -> int:
    """A site daemon's index in the federation: the position of its name in the server's list
    of registered sites (sorted, so the order of the server's config file does not matter)."""
    name = str(node_config[SITE_NAME])
    sites = json.loads(str(run_config[SITES]))
    if name not in sites:
        raise FedloraError(
            f"This site is {name!r}, but the federation's server lists only {', '.join(sites)}; "
            "check [site] name in site.toml against [sites] in the server's config."
        )
    return sites.index(name)
