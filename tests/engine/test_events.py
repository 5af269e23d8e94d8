"""Events: their dict form (what ``--events`` writes) matches the dataclass fields."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from fleet.engine import events
from fleet.engine.events import Event

SAMPLES: dict[object, object] = {str: "x", int: 3, float: 1.5, bool: True, int | None: None}
EVENT_TYPES = sorted((c for c in vars(events).values()
                      if isinstance(c, type) and issubclass(c, Event) and c is not Event),
                     key=lambda c: c.kind)


@pytest.mark.parametrize("cls", EVENT_TYPES, ids=lambda c: c.kind)
def test_to_dict_is_asdict_with_the_kind_first(cls: type[Event]) -> None:
    hints = typing.get_type_hints(cls)
    values = {f.name: SAMPLES[hints[f.name]] for f in dataclasses.fields(cls)}
    event = cls(**values)
    assert event.to_dict() == {"event": cls.kind, **dataclasses.asdict(event)}
    assert list(event.to_dict()) == ["event"] + [f.name for f in dataclasses.fields(cls)]
