"""Transport: the zenoh session, topics, wire messages and event ordering."""
