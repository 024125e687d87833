"""Name -> factory registries for models, trainers and (later) ops and evaluators."""

from typing import Any, Callable, Dict, Iterable


class Registry:
  """A named collection of factories; an unknown name is an error listing the known ones."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: Dict[str, Callable[..., Any]] = {}

  def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorator(factory):
      self.add(name, factory)
      return factory
    return decorator

  def add(self, name: str, factory: Callable[..., Any]) -> None:
    if name in self._entries:
      raise ValueError(f'{self.kind} {name!r} is registered twice.')
    self._entries[name] = factory

  def get(self, name: str) -> Callable[..., Any]:
    try:
      return self._entries[name]
    except KeyError:
      raise KeyError(
          f'Unknown {self.kind} {name!r}. Known: {", ".join(sorted(self._entries))}.'
      ) from None

  def names(self) -> Iterable[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries
