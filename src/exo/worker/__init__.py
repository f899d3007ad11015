"""Worker: telemetry, planning and the runner processes that execute model layers."""
