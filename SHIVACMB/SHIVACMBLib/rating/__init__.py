"""Rating sessions: raters' append-only logs, blind and assisted modes, export, and agreement statistics."""
