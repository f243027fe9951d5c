"""Reports: the measured model report and run reports. Only the CLI imports this package."""
