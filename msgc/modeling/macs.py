"""MAC accounting exactly as the reference's ``get_flops()`` counts it.

Every gated block reports :class:`Costs` for an input size, split as the reference splits them:

- ``main``: work that no gate touches (stem, downsampling, MobileNetV2's expansions, the head, ...);
- ``dgc``: the gated convolutions at full width (including the attention multiplications);
- ``gen``: the gate and attention generators and the pooling of their context;
- ``extra``: the attention multiplications, which the dense host does not have.

The dense host costs ``main + dgc - extra``; the lowest reachable cost is ``main + dgc / heads + gen``.
A sample's dynamic MACs are ``main + sum(gated layer MACs x that sample's mean gate) + gen - bonus``,
where the bonus is the work on channels that no head reads (computed by each block in its forward).
"""
from dataclasses import dataclass, fields

__all__ = ["Costs", "conv_out"]


def conv_out(size: int, kernel: int, padding: int = 0, stride: int = 1) -> int:
    """Output side of a convolution or pooling (floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


@dataclass
class Costs:
    """Static MACs per sample of a module, split as the reference splits them."""

    main: int = 0
    dgc: int = 0
    gen: int = 0
    extra: int = 0

    def __add__(self, other: "Costs") -> "Costs":
        return Costs(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def original(self) -> int:
        """The dense host's MACs."""
        return self.main + self.dgc - self.extra

    def possible(self, heads: int) -> float:
        """The lowest reachable MACs: every head reads 1/heads of the gated work."""
        return self.main + self.dgc / heads + self.gen

    def as_dict(self, heads: int) -> dict:
        return {"original": self.original, "possible": self.possible(heads), "main": self.main,
                "dgc": self.dgc, "gen": self.gen}
