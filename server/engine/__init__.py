"""The engine layer: runs model work off the event loop, schedules and batches requests."""
