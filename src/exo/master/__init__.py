"""The master: turns commands into events and places model instances across devices."""
