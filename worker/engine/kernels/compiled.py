"""A set of small functions that run eagerly until compile() swaps each for its torch.compile'd version (one fused
kernel on CUDA); callers read them as attributes, so a module-level set switches every call site at once."""

from collections.abc import Callable

import torch


class Compilable:
    def __init__(self, **functions: Callable) -> None:
        self._eager = functions
        self.__dict__.update(functions)
        self.compiled = False

    def compile(self) -> None:
        if self.compiled:
            return
        self.__dict__.update({name: torch.compile(fn, dynamic=True) for name, fn in self._eager.items()})
        self.compiled = True
