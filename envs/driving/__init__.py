"""Driving: batched vehicles, maps, scoring and the Gymnasium environments (issue 4, in progress)."""
