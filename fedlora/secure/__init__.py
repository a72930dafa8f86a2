"""Secure aggregation and key material: the server learns only sums; sites prove who they are."""
