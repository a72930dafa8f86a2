"""Real deployment: `fedlora certs`, `fedlora server` (Flower SuperLink + the federation) and
`fedlora client` (one hospital site: a Flower SuperNode and a long-lived ClientApp process)."""
