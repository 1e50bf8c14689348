"""fvcore's Registry, with an unknown-name error that lists what is registered."""
from fvcore.common.registry import Registry as _FvcoreRegistry

from .errors import UserError

__all__ = ["Registry", "UnknownNameError"]


class UnknownNameError(UserError, KeyError):
    """A registry was asked for a name that nothing registered."""

    def __str__(self):
        return str(self.args[0])


class Registry(_FvcoreRegistry):
    """A name -> object map filled by the ``@REGISTRY.register()`` decorator."""

    def register(self, obj=None):
        """``@register()`` registers under the object's ``__name__``; ``@register("name")`` under a name."""
        if isinstance(obj, str):
            name = obj

            def deco(func_or_class):
                self._do_register(name, func_or_class)
                return func_or_class

            return deco
        return super().register(obj)

    def get(self, name):
        obj = self._obj_map.get(name)
        if obj is None:
            known = ", ".join(sorted(self._obj_map)) or "none"
            raise UnknownNameError(f"no {self._name.lower()} named '{name}' is registered; registered: {known} "
                                   "(a name of your own module's needs --import MODULE or IMPORTS: [MODULE])")
        return obj

    def names(self):
        """The registered names, sorted."""
        return sorted(self._obj_map)
