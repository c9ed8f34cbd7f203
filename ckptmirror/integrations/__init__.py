"""Framework integrations, one module per framework, each an optional extra.

Nothing here is imported by ``import ckptmirror``: each module imports its framework itself, so a
training environment without that framework never pays for it (or fails on it). Import the one
you use, e.g. ``from ckptmirror.integrations.transformers import MirrorCallback``.
"""
