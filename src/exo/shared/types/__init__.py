"""Pydantic models shared by every component: ids, memory, node and GPU info, events, commands, state."""
