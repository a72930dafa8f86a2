"""Flower glue: the ClientApp and ServerApp around fedlora's pure training and strategy code."""
