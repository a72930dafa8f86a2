"""Differential privacy: DP-SGD at the sites (sample level), clipped and noised site updates
(client level), and the accounting that turns both into an epsilon anyone can recompute."""
