"""Model transforms that run on every backend: the graph, weights moved by name, convert / revert, surgery, fold, recalibrate."""
