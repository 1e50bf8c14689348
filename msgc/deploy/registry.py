"""Deployers registered by the class they deploy and found through the class hierarchy (so that a
subclass deploys as its nearest registered base)."""
from typing import Callable, Dict

__all__ = ["TypeRegistry"]


class TypeRegistry:
    """Class -> deployer, looked up along ``type(obj).__mro__``.

    Args:
        what: what is deployed ("backbone", "block"), for messages.
        name: the registry's public name, for the message that says how to register.
        contract: what an entry must be.
    """

    def __init__(self, what: str, name: str, contract: str):
        self.what, self.name, self.contract = what, name, contract
        self._map: Dict[type, Callable] = {}

    def register(self, cls: type) -> Callable:
        """Decorator: ``@REGISTRY.register(MyBackbone)`` over the deployer of ``MyBackbone``."""
        def deco(deployer):
            self._map[cls] = deployer
            return deployer

        return deco

    def get(self, obj) -> Callable:
        for cls in type(obj).__mro__:
            if cls in self._map:
                return self._map[cls]
        t = type(obj)
        raise ValueError(f"deploy: no deployer for the {self.what} {t.__module__}.{t.__qualname__}; register one "
                         f"with @{self.name}.register({t.__name__}) ({self.contract})")

    def __contains__(self, cls: type) -> bool:
        return cls in self._map
