"""Identifiers. Plain strings on the wire; distinct types in the code."""

import uuid
from typing import NewType

NodeId = NewType("NodeId", str)
CommandId = NewType("CommandId", str)
EventId = NewType("EventId", str)
InstanceId = NewType("InstanceId", str)
RunnerId = NewType("RunnerId", str)
TaskId = NewType("TaskId", str)
DeviceId = NewType("DeviceId", str)
"""A device's id on its own node, e.g. ``cuda:0``. Unique only together with a NodeId."""


def new_uuid() -> str:
    return str(uuid.uuid4())


def new_event_id() -> EventId:
    return EventId(new_uuid())


def new_command_id() -> CommandId:
    return CommandId(new_uuid())
