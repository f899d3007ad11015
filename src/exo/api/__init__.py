"""The HTTP API: state, events, instances, GPUs and the OpenAI-compatible chat endpoint."""
