"""Gymnasium environments (installed as ``trajgen.envs``)."""
