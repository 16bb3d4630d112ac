"""routelab analysis: load and specialisation metrics, recording, plots and the CLI."""

__all__: list[str] = []
