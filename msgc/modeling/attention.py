"""Channel attention of the gated convolutions.

``ATTENTION_REGISTRY`` holds one entry per kind; :func:`build_attention` returns it by name.
"""
from ..utils.registry import Registry

from .layers import AttentionGenerator

__all__ = ["ATTENTION_REGISTRY", "build_attention"]

ATTENTION_REGISTRY = Registry("ATTENTION")
ATTENTION_REGISTRY.__doc__ = """
Registry for attentions, selected by ``MODEL.MSGC.ATTENTION``.

An entry is a callable ``entry(in_channels, channels, heads, reduction)`` returning either None (no
attention) or a module that maps a context ``N x in_channels x 1 x 1`` to multipliers
``N x heads x channels`` and has a ``macs`` attribute (its cost per sample). Backbones call it for the
convolutions that the reference gives attention.
"""


@ATTENTION_REGISTRY.register("none")
def no_attention(in_channels, channels, heads, reduction):
    """No attention: the masks alone scale the channels."""
    return None


@ATTENTION_REGISTRY.register("channel")
def channel_attention(in_channels, channels, heads, reduction):
    """Per-sample, per-head channel attention generated from the context (starts at exactly 1)."""
    return AttentionGenerator(in_channels, channels, heads, reduction)


def build_attention(name: str):
    """Return the attention entry registered as ``name`` (an unknown name lists the registered ones)."""
    return ATTENTION_REGISTRY.get(name)
